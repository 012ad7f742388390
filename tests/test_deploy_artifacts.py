"""Checks of the operations artifacts: systemd units, the compose stack, alerts and dashboards.

The external tools these tests run come from Debian packages; a missing one fails the test with
the package to install (systemd, prometheus, redis-server), it is never skipped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml
from redis.exceptions import AuthenticationError, NoPermissionError
from tests.support.tools import require_tool

from jlm.config import OPERATIONS, Settings, load_file
from jlm.metrics import Metrics
from jlm.worker.store import SCRIPTS as WORKER_SCRIPTS

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "systemd"
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"

UNIT = SYSTEMD / "job-lifecycle-manager.service"
TEMPLATE = SYSTEMD / "job-lifecycle-manager@.service"
EXEC_START = "ExecStart=/opt/job-lifecycle-manager/bin/jlm run"
MAX_EXPOSURE = 2.0

ALERTS = (
    "JlmDown",
    "JlmNotReady",
    "JlmRejectionRateHigh",
    "JlmPublishConfirmSlow",
    "JlmZombieCompletions",
    "JlmBacklogGrowing",
    "JlmDependencyDown",
)

# Labels Prometheus adds to every series (job, instance) and the histogram bucket label.
TARGET_LABELS = frozenset({"job", "instance", "le"})
PROMQL_WORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"bool", "offset", "inf", "nan"}
)
_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="", LC_ALL="C.UTF-8")
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


# -- systemd --------------------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file, by key, in order (continuation lines are not used)."""
    settings: dict[str, list[str]] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a Key=value line: {raw!r}"
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def verifiable_copy(unit: Path, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a stand-in executable; nothing else is changed.

    The real binary lives in /opt/job-lifecycle-manager, which only an installed host has, and
    `systemd-analyze verify` checks that ExecStart names an executable file.
    """
    fake = tmp_path / "bin" / "jlm"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    fake.chmod(0o755)
    text = unit.read_text(encoding="utf-8")
    assert text.count(EXEC_START + "\n") == 1, f"{unit.name} must contain `{EXEC_START}` once"
    copy = tmp_path / unit.name
    copy.write_text(text.replace(EXEC_START, f"ExecStart={fake} run"), encoding="utf-8")
    return copy


@pytest.mark.unit
@pytest.mark.parametrize(
    ("unit", "name"),
    [(UNIT, "job-lifecycle-manager.service"), (TEMPLATE, "job-lifecycle-manager@1.service")],
)
def test_systemd_unit_verifies_clean(unit: Path, name: str, tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze", "systemd")
    verifiable_copy(unit, tmp_path)
    result = run(tool, "verify", str(tmp_path / name))
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, f"systemd-analyze verify {name} failed:\n{output}"
    assert not output, f"systemd-analyze verify {name} printed warnings:\n{output}"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("unit", "name"),
    [(UNIT, "job-lifecycle-manager.service"), (TEMPLATE, "job-lifecycle-manager@1.service")],
)
def test_systemd_unit_exposure_is_low(unit: Path, name: str, tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze", "systemd")
    verifiable_copy(unit, tmp_path)
    result = run(tool, "security", "--offline=yes", str(tmp_path / name))
    assert result.returncode == 0, f"systemd-analyze security failed:\n{result.stderr}"
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert found, f"no overall exposure level in the output:\n{result.stdout[-2000:]}"
    exposure = float(found.group(1))
    flagged = "\n".join(line for line in result.stdout.splitlines() if line.startswith("\u2717"))
    assert exposure <= MAX_EXPOSURE, (
        f"{name}: exposure {exposure} is above {MAX_EXPOSURE}; settings to tighten:\n{flagged}"
    )


@pytest.mark.unit
def test_systemd_unit_has_the_contracted_settings() -> None:
    s = unit_settings(UNIT)
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "78",
        "TimeoutStopSec": "30s",
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "MemoryDenyWriteExecute": "yes",
        "ProtectSystem": "strict",
        "ProtectProc": "invisible",
        "ProcSubset": "pid",
        "UMask": "0077",
        "DevicePolicy": "closed",
        "IPAddressDeny": "any",
        "IPAddressAllow": "localhost",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallArchitectures": "native",
        "EnvironmentFile": "-/etc/job-lifecycle-manager/jlm.env",
    }
    wrong = {k: (s.get(k), v) for k, v in expected.items() if s.get(k) != [v]}
    assert not wrong, f"unit settings differ (found, expected): {wrong}"
    assert "@system-service" in s["SystemCallFilter"], "SystemCallFilter must allow @system-service"
    credentials = {value.split(":", 1)[0] for value in s.get("LoadCredential", [])}
    assert credentials >= {"amqp_url", "redis_url"}, (
        f"LoadCredential must pass amqp_url and redis_url, found {sorted(credentials)}"
    )


@pytest.mark.unit
def test_template_unit_gives_each_instance_its_own_port() -> None:
    main, template = unit_settings(UNIT), unit_settings(TEMPLATE)
    assert "JLM_METRICS_ADDR=127.0.0.1:946%i" in template.get("Environment", []), (
        "the template must set Environment=JLM_METRICS_ADDR=127.0.0.1:946%i"
    )
    # Apart from the per-instance lines, the template is the single unit.
    per_instance = {"Description", "Environment", "EnvironmentFile", "User"}
    differing = sorted(k for k in main.keys() | template.keys() if main.get(k) != template.get(k))
    assert set(differing) <= per_instance, f"template and unit differ beyond instances: {differing}"


def env_example_defaults() -> dict[str, str]:
    text = (SYSTEMD / "jlm.env.example").read_text(encoding="utf-8")
    return dict(re.findall(r"^#(JLM_[A-Z0-9_]+)=(.*)$", text, flags=re.MULTILINE))


@pytest.mark.unit
def test_env_example_lists_every_setting_with_its_default() -> None:
    shown = env_example_defaults()
    fields = {name: f for name, f in Settings.model_fields.items() if name != "file"}
    missing = sorted(f"JLM_{n.upper()}" for n in fields if f"JLM_{n.upper()}" not in shown)
    assert not missing, f"jlm.env.example does not list: {missing}"
    secret_files = {"JLM_AMQP_URL_FILE", "JLM_REDIS_URL_FILE"}
    unknown = sorted(k for k in shown if k not in secret_files and k[4:].lower() not in fields)
    assert not unknown, f"jlm.env.example lists variables the daemon does not read: {unknown}"
    wrong = {}
    for name, field in fields.items():
        default, value = field.default, shown[f"JLM_{name.upper()}"]
        if default is None:
            continue
        if isinstance(default, bool):
            same = value.lower() == str(default).lower()
        elif isinstance(default, int | float):
            same = float(value) == float(default)
        else:
            same = value == str(default)
        if not same:
            wrong[f"JLM_{name.upper()}"] = (value, default)
    assert not wrong, f"jlm.env.example shows wrong defaults (shown, actual): {wrong}"


# -- Prometheus -----------------------------------------------------------------------------------


@pytest.mark.unit
def test_promtool_checks_the_rules() -> None:
    tool = require_tool("promtool", "prometheus")
    result = run(tool, "check", "rules", "alerts.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, f"promtool check rules:\n{result.stdout}{result.stderr}"


@pytest.mark.unit
def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    tool = require_tool("promtool", "prometheus")
    result = run(tool, "test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, f"promtool test rules:\n{result.stdout}{result.stderr}"


@pytest.mark.unit
def test_promtool_checks_the_prometheus_config() -> None:
    tool = require_tool("promtool", "prometheus")
    result = run(tool, "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, f"promtool check config:\n{result.stdout}{result.stderr}"


def alert_rules() -> dict[str, dict[str, Any]]:
    doc = load_yaml(PROMETHEUS / "alerts.yml")
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def github_anchor(heading: str) -> str:
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def runbook_anchors() -> set[str]:
    text = OPERATIONS_DOC.read_text(encoding="utf-8")
    _, found, runbooks = text.partition("\n## Runbooks\n")
    assert found, "docs/operations.md has no `## Runbooks` section"
    runbooks = runbooks.split("\n## ", 1)[0]
    return {github_anchor(h) for h in re.findall(r"^### (.+)$", runbooks, flags=re.MULTILINE)}


@pytest.mark.unit
def test_every_alert_links_to_its_runbook() -> None:
    rules = alert_rules()
    assert sorted(rules) == sorted(ALERTS), f"alerts.yml defines {sorted(rules)}"
    anchors = runbook_anchors()
    for name, rule in rules.items():
        url = rule.get("annotations", {}).get("runbook_url", "")
        assert url.endswith(f"docs/operations.md#{github_anchor(name)}"), (
            f"{name}: runbook_url {url!r} must point at docs/operations.md#{github_anchor(name)}"
        )
        assert github_anchor(name) in anchors, f"docs/operations.md has no `### {name}` runbook"


@pytest.mark.unit
def test_every_alert_is_tested_firing_and_not_firing() -> None:
    doc = load_yaml(PROMETHEUS / "alerts_test.yml")
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert not set(ALERTS) - fires, f"no test shows firing: {sorted(set(ALERTS) - fires)}"
    assert not set(ALERTS) - quiet, f"no test shows not firing: {sorted(set(ALERTS) - quiet)}"


# -- metric names ---------------------------------------------------------------------------------

SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
}


def exposed_metrics() -> dict[str, frozenset[str]]:
    """Every sample name the daemon exposes, with the label names of its series."""
    metrics = Metrics()
    names: dict[str, frozenset[str]] = {"up": frozenset()}
    for collector in vars(metrics).values():
        describe = getattr(collector, "describe", None)
        if describe is None:
            continue
        labels = frozenset(getattr(collector, "_labelnames", ()))
        for family in describe():
            for suffix in SUFFIXES[family.type]:
                names[family.name + suffix] = labels
    assert len(names) > 1, "jlm.metrics.Metrics exposes no metric families"
    return names


def metric_references(expr: str) -> tuple[set[str], set[str]]:
    """The metric names a PromQL expression reads, and the label names it groups or filters by."""
    text = _STRING.sub('""', expr)
    labels = {
        name.strip()
        for group in _GROUPING.findall(text)
        for name in group.split(",")
        if name.strip()
    }
    for _, matchers in _SELECTOR.findall(text):
        labels |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    text = re.sub(r"(?<![\w.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("(") or word.lower() in PROMQL_WORDS:
            continue  # a function call or an operator
        names.add(word)
    return names, labels


def check_exprs(where: str, exprs: list[str]) -> None:
    exposed = exposed_metrics()
    problems = []
    for expr in exprs:
        names, labels = metric_references(expr)
        if not names:
            problems.append(f"reads no metric: {expr}")
        unknown = sorted(n for n in names if n not in exposed)
        if unknown:
            problems.append(f"unknown metrics {unknown}: {expr}")
            continue
        allowed = TARGET_LABELS.union(*(exposed[n] for n in names))
        if labels - allowed:
            problems.append(f"labels {sorted(labels - allowed)} not on {sorted(names)}: {expr}")
    assert not problems, f"{where}:\n" + "\n".join(problems)


@pytest.mark.unit
def test_metric_reference_parser() -> None:
    names, labels = metric_references(
        "histogram_quantile(0.99, sum by (op, le) (rate(jlm_request_duration_seconds_bucket"
        '{instance=~"$instance", op!="x"}[$__rate_interval]))) > 0.5 and on() up == 1e3'
    )
    assert names == {"jlm_request_duration_seconds_bucket", "up"}
    assert labels == {"op", "le", "instance"}


@pytest.mark.unit
def test_alerts_use_only_exposed_metrics() -> None:
    check_exprs("alerts.yml", [str(rule["expr"]) for rule in alert_rules().values()])


def dashboard() -> dict[str, Any]:
    with (GRAFANA / "dashboards" / "jlm.json").open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def panel_exprs(panel: dict[str, Any]) -> list[str]:
    return [t["expr"] for t in panel.get("targets", []) if t.get("expr")]


@pytest.mark.unit
def test_dashboard_panels_use_only_exposed_metrics() -> None:
    exprs = [e for p in all_panels(dashboard()["panels"]) for e in panel_exprs(p)]
    assert exprs, "the dashboard has no panel queries"
    check_exprs("grafana/dashboards/jlm.json", exprs)


@pytest.mark.unit
def test_dashboard_covers_every_area() -> None:
    board = dashboard()
    panels = [p for p in all_panels(board["panels"]) if p.get("type") != "row"]
    for panel in panels:
        assert panel_exprs(panel), f"panel {panel.get('title')!r} has no query"
        assert panel.get("title"), f"a panel has no title: {panel_exprs(panel)}"
    read = {n for p in panels for e in panel_exprs(p) for n in metric_references(e)[0]}
    areas = {
        "throughput by op and outcome": "jlm_requests_total",
        "enqueued": "jlm_jobs_enqueued_total",
        "superseded": "jlm_jobs_superseded_total",
        "deduplicated": "jlm_jobs_deduplicated_total",
        "cancelled": "jlm_jobs_cancelled_total",
        "invalidations": "jlm_cache_invalidations_total",
        "request latency": "jlm_request_duration_seconds_bucket",
        "in-flight": "jlm_inflight_requests",
        "dependencies": "jlm_dependency_up",
        "readiness": "jlm_ready",
        "queue depths": "jlm_queue_messages",
        "jobs claimed": "jlm_jobs_claimed_total",
        "jobs finished": "jlm_jobs_finished_total",
        "jobs skipped": "jlm_jobs_skipped_total",
        "zombie completions": "jlm_zombie_completions_total",
        "jobs recovered": "jlm_jobs_recovered_total",
        "cancel latency": "jlm_cancel_latency_seconds_bucket",
        "redis script time": "jlm_redis_script_duration_seconds_bucket",
        "publish-confirm time": "jlm_publish_confirm_duration_seconds_bucket",
        "dead letters by code": "jlm_dead_lettered_total",
    }
    uncovered = sorted(area for area, metric in areas.items() if metric not in read)
    assert not uncovered, f"no dashboard panel shows: {uncovered}"
    latency = " ".join(
        e for p in panels for e in panel_exprs(p) if "jlm_request_duration_seconds_bucket" in e
    )
    for q in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({q}," in latency, f"no p{q[2:]} request latency panel query"
    throughput = " ".join(e for p in panels for e in panel_exprs(p) if "jlm_requests_total" in e)
    assert re.search(r"by \(op, outcome\)", throughput), "throughput must be split by op, outcome"


@pytest.mark.unit
def test_dashboard_layout_and_provisioning() -> None:
    board = dashboard()
    assert board.get("uid"), "the dashboard needs a uid"
    assert board.get("title"), "the dashboard needs a title"
    taken: list[tuple[str, int, int, int, int]] = []
    for panel in all_panels(board["panels"]):
        g = panel["gridPos"]
        x, y, w, h = g["x"], g["y"], g["w"], g["h"]
        assert x + w <= 24, f"panel {panel.get('title')!r} is wider than the grid"
        for title, ox, oy, ow, oh in taken:
            overlap = x < ox + ow and ox < x + w and y < oy + oh and oy < y + h
            assert not overlap, f"panels {title!r} and {panel.get('title')!r} overlap"
        taken.append((panel.get("title", ""), x, y, w, h))
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "jlm.yml")
    path = provider["providers"][0]["options"]["path"]
    datasource = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts.get("./grafana/dashboards") == path, (
        f"the dashboards folder must be mounted at the provider's path {path}"
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert datasource["datasources"][0]["type"] == "prometheus"


# -- the compose stack ----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(DEPLOY / "docker-compose.yml")
    return data


PINNED_TAG = re.compile(r"^[a-z0-9][a-z0-9./_-]*:v?\d+\.\d+(\.\d+)*(-[A-Za-z0-9._-]+)?$")


@pytest.mark.unit
def test_compose_images_are_pinned() -> None:
    services = compose()["services"]
    expected = {"rabbitmq", "redis", "daemon", "worker", "prometheus", "grafana"}
    assert expected <= set(services), f"missing services: {sorted(expected - set(services))}"
    for name, service in services.items():
        image = service.get("image", "")
        assert PINNED_TAG.match(image), f"{name}: image {image!r} is not pinned to an exact version"
        assert "latest" not in image, f"{name}: image {image!r} uses latest"
    assert re.match(r"^rabbitmq:3\.\d+\.\d+-management$", services["rabbitmq"]["image"])
    assert re.match(r"^redis:7\.\d+\.\d+", services["redis"]["image"])


@pytest.mark.unit
def test_compose_services_are_wired() -> None:
    c = compose()
    services = c["services"]
    redis_cmd = services["redis"]["command"]
    assert "--appendonly" in redis_cmd, "Redis must run with appendonly"
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes", "Redis needs appendonly yes"
    assert services["worker"]["command"] == [
        "worker",
        "examples.echo:handle",
        "--job-type",
        "demo",
    ]
    assert (ROOT / "examples" / "echo.py").is_file(), "the compose worker needs examples/echo.py"
    build = services["daemon"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), "daemon build is broken"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    daemon_config = services["daemon"]["environment"]["JLM_CONFIG"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["daemon"]["volumes"]}
    load_file(DEPLOY / mounted[daemon_config])
    # The worker reads the same file (max_attempts, retry_backoff, queue of its job type).
    worker = services["worker"]
    worker_mounts = {v.split(":")[1]: v.split(":")[0] for v in worker["volumes"]}
    assert worker_mounts[worker["environment"]["JLM_CONFIG"]] == mounted[daemon_config]
    # Healthy means ready, and the worker waits for its queue rather than for a healthy daemon.
    for name in ("daemon", "worker"):
        probe = " ".join(services[name]["healthcheck"]["test"])
        assert "/readyz" in probe, f"{name}: the healthcheck must query /readyz"
    assert "daemon" not in worker.get("depends_on", {})


@pytest.mark.unit
def test_dockerfile_is_pinned_non_root_and_health_checked() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.MULTILINE))
    bases = [args.get(b.strip("${}"), b) for b in re.findall(r"^FROM (\S+)", text, re.MULTILINE)]
    assert bases, "the Dockerfile has no FROM"
    for base in bases:
        assert re.match(r"^python:3\.\d+\.\d+-slim", base), f"base image {base!r} is not pinned"
    users = re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE)
    assert users, "the image must switch to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0"), f"the image runs as {users[-1]}"
    health = re.search(r"^HEALTHCHECK (?:.*\\\n)*.*", text, flags=re.MULTILINE)
    assert health, "the image has no HEALTHCHECK"
    assert "/readyz" in health.group(0), "HEALTHCHECK must query /readyz: healthy means ready"
    assert ":9464" in health.group(0), "HEALTHCHECK must query port 9464"
    assert "pip install" in text, "the image installs the project with pip"


# -- RabbitMQ users -------------------------------------------------------------------------------


def definitions() -> dict[str, Any]:
    with (DEPLOY / "rabbitmq" / "definitions.json").open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def allowed(pattern: str, name: str) -> bool:
    """RabbitMQ grants a permission when its regular expression matches the name anywhere."""
    return re.search(pattern, name) is not None


JLM = {"jlm.requests", "jlm.jobs", "jlm.jobs.demo", "jlm.events", "jlm.provenance", "jlm.dead"}
# Look-alike names a too-loose pattern would match.
DECOYS = {"jlm.requests.x", "jlm.eventsx", "other", "amq.topic"}
RESOURCES = sorted(JLM | DECOYS | {"amq.gen-x1", "amq.default"})
JLM_ANY = JLM | {"jlm.requests.x", "jlm.eventsx"}
# (user, permission): every resource name it must allow; it must refuse all other RESOURCES.
# The daemon answers through the default exchange, which permissions call amq.default.
GRANTS: dict[tuple[str, str], set[str]] = {
    ("jlm-daemon", "configure"): JLM_ANY | {"amq.gen-x1"},
    ("jlm-daemon", "write"): JLM_ANY | {"amq.gen-x1", "amq.default"},
    ("jlm-daemon", "read"): JLM_ANY | {"amq.gen-x1"},
    ("publisher", "configure"): {"amq.gen-x1"},
    ("publisher", "write"): {"jlm.requests"},
    ("publisher", "read"): {"amq.gen-x1"},
    ("worker", "configure"): set(),
    ("worker", "write"): {"jlm.jobs", "jlm.events"},
    ("worker", "read"): {"jlm.jobs.demo"},
}


@pytest.mark.unit
def test_rabbitmq_users_have_least_privilege() -> None:
    d = definitions()
    assert {"name": "/"} in d["vhosts"], "definitions must create the / vhost"
    users = {u["name"]: u for u in d["users"]}
    assert {"jlm-daemon", "publisher", "worker"} <= set(users), f"users: {sorted(users)}"
    assert "guest" not in users, "the guest user must not be defined"
    for name in ("jlm-daemon", "publisher", "worker"):
        assert not users[name]["tags"], f"{name} needs no management tags"
    perms = {p["user"]: p for p in d["permissions"] if p["vhost"] == "/"}
    problems = []
    for (user, kind), granted in GRANTS.items():
        assert user in perms, f"{user} has no permissions on vhost /"
        pattern = perms[user][kind]
        for name in RESOURCES:
            if allowed(pattern, name) != (name in granted):
                verb = "refuses" if name in granted else "allows"
                problems.append(f"{user} {kind} {pattern!r} {verb} {name}")
    topics = {(t["user"], t["exchange"]): t for t in d.get("topic_permissions", [])}
    routing = topics.get(("publisher", "jlm.requests"), {}).get("write", "")
    for key in ("manage", "cancel", "status", "invalidate", "result", "other", "manage.x"):
        if allowed(routing, key) != (key in OPERATIONS):
            problems.append(f"publisher routing keys {routing!r} mishandle {key!r}")
    assert not problems, "\n".join(problems)


WORKER_EVENTS = (
    *("job.claimed", "job.succeeded", "job.failed", "job.cancelled", "job.skipped"),
    *("job.released", "job.progress"),
)
DAEMON_ONLY_EVENTS = ("job.enqueued", "job.superseded", "request.rejected", "job.deduplicated")


@pytest.mark.unit
def test_worker_may_publish_only_worker_events() -> None:
    topics = {(t["user"], t["exchange"]): t for t in definitions()["topic_permissions"]}
    events = topics.get(("worker", "jlm.events"))
    assert events, "the worker user has no topic permission on jlm.events"
    assert events["vhost"] == "/"
    for key in WORKER_EVENTS:
        assert allowed(events["write"], key), f"the worker may not publish {key}"
    for key in (*DAEMON_ONLY_EVENTS, "job.claimed.x", "xjob.claimed", "#"):
        assert not allowed(events["write"], key), f"the worker may publish {key}"
    assert events["read"] == "^$"


def rabbitmq_hash_matches(password: str, encoded: str) -> bool:
    """rabbit_password_hashing_sha256: base64(salt + sha256(salt + password)), 4-byte salt."""
    raw = base64.b64decode(encoded)
    salt, digest = raw[:4], raw[4:]
    return hashlib.sha256(salt + password.encode()).digest() == digest


@pytest.mark.unit
def test_compose_passwords_match_the_broker_and_redis_users() -> None:
    services = compose()["services"]
    users = {u["name"]: u for u in definitions()["users"]}
    for service in ("daemon", "worker"):
        env = services[service]["environment"]
        amqp = urlsplit(env["JLM_AMQP_URL"])
        user = users.get(amqp.username or "")
        assert user, f"{service} logs in to RabbitMQ as unknown user {amqp.username!r}"
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert rabbitmq_hash_matches(amqp.password or "", user["password_hash"]), (
            f"{service}: the password in JLM_AMQP_URL does not match definitions.json"
        )
        redis_url = urlsplit(env["JLM_REDIS_URL"])
        role = REDIS_USERS[service]
        assert redis_url.username == role, f"{service} must use the Redis user {role}"
        digest = hashlib.sha256((redis_url.password or "").encode()).hexdigest()
        acl = (DEPLOY / "redis" / "users.acl").read_text(encoding="utf-8")
        assert re.search(rf"^user {role} on .*#{digest}\b", acl, flags=re.MULTILINE), (
            f"{service}: the password in JLM_REDIS_URL does not match users.acl"
        )


# -- Redis ACL ------------------------------------------------------------------------------------

REDIS_USERS = {"daemon": "jlm", "worker": "jlm-worker"}

PROBE_PASSWORD = secrets.token_hex(16)


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[Path]:
    """A throw-away redis-server on a Unix socket, with users.acl plus a `probe` admin user."""
    server = require_tool("redis-server", "redis-server")
    acl = tmp_path / "users.acl"
    shipped = (DEPLOY / "redis" / "users.acl").read_text(encoding="utf-8")
    acl.write_text(f"{shipped.rstrip()}\nuser probe on >{PROBE_PASSWORD} ~* &* +@all\n")
    sock = tmp_path / "redis.sock"
    args = [server, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
    args += ["--save", "", "--appendonly", "no", "--dir", str(tmp_path), "--aclfile", str(acl)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None:
                pytest.fail(f"redis-server refused users.acl:\n{proc.communicate()[0][-2000:]}")
            assert time.monotonic() < deadline, "redis-server did not start within 10 s"
            time.sleep(0.05)
        yield sock
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def redis_password(service: str = "daemon") -> str:
    url = urlsplit(compose()["services"][service]["environment"]["JLM_REDIS_URL"])
    assert url.password, f"the compose {service}'s JLM_REDIS_URL has no password"
    return url.password


def test_redis_acl_confines_the_jlm_user(acl_redis: Path) -> None:
    anonymous = redis.Redis(unix_socket_path=str(acl_redis))
    with anonymous, pytest.raises(AuthenticationError):
        anonymous.ping()
    with redis.Redis(
        unix_socket_path=str(acl_redis),
        username="jlm",
        password=redis_password(),
        decode_responses=True,
    ) as r:
        assert r.ping()
        assert r.set("jlm:{t}:probe", "1")
        assert r.eval("return redis.call('GET', KEYS[1])", 1, "jlm:{t}:probe") == "1"
        sha = r.script_load("return redis.call('HSET', KEYS[1], 'f', ARGV[1])")
        assert r.evalsha(sha, 1, "jlm:{t}:h", "v") == 1
        assert r.publish("jlm:cancel", "x") == 0
        refused = [
            ("GET", "other:key"),
            ("SET", "other:key", "1"),
            ("PUBLISH", "other", "x"),
            ("EVAL", "return 1", "1", "other:key"),
            ("FLUSHALL",),
            ("KEYS", "*"),
            ("CONFIG", "GET", "maxmemory"),
            ("SHUTDOWN",),
        ]
        for command in refused:
            with pytest.raises(NoPermissionError):
                r.execute_command(*command)


# The scripts each Redis user runs (None: all; prelude.lua is loaded with every one, result.lua is
# the worker's readiness probe), and a key the user may reach.
LUA_OF_USER: dict[str, tuple[tuple[str, ...] | None, str]] = {
    "jlm": (None, "jlm:{t}:k"),
    "jlm-worker": (("prelude", "result", *WORKER_SCRIPTS), "jlm:{t}:job:k"),
}


@pytest.mark.parametrize("user", list(LUA_OF_USER))
def test_redis_acl_allows_every_command_of_the_lua_scripts(acl_redis: Path, user: str) -> None:
    names, key = LUA_OF_USER[user]
    lua = ROOT / "daemon" / "jlm" / "lua"
    scripts = sorted(p for p in lua.glob("*.lua") if names is None or p.stem in names)
    assert scripts, "no Lua scripts found under daemon/jlm/lua"
    called = {
        name.upper()
        for path in scripts
        for name in re.findall(r"redis\.p?call\(\s*['\"]([A-Za-z]+)", path.read_text("utf-8"))
    }
    assert called, "no redis.call found in the Lua scripts"
    with redis.Redis(
        unix_socket_path=str(acl_redis), username="probe", password=PROBE_PASSWORD
    ) as admin:
        refused = {}
        for command in sorted(called):
            info = admin.execute_command("COMMAND", "INFO", command)
            assert command.lower() in info, f"redis-server does not know {command}"
            arity = int(info[command.lower()]["arity"])
            args = [key] * (abs(arity) - 1)
            answer = admin.execute_command("ACL", "DRYRUN", user, command, *args)
            if answer != b"OK":
                refused[command] = answer.decode()
    assert not refused, f"users.acl refuses commands the Lua scripts call: {refused}"


# -- configuration examples and docs --------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("name", ["config.example.toml", "config.compose.toml"])
def test_config_examples_load(name: str) -> None:
    path = DEPLOY / name
    with path.open("rb") as f:
        tomllib.load(f)
    load_file(path)


@pytest.mark.unit
def test_operations_doc_has_a_runbook_per_alert() -> None:
    anchors = runbook_anchors()
    missing = [a for a in ALERTS if github_anchor(a) not in anchors]
    assert not missing, f"docs/operations.md lacks runbooks for {missing}"


@pytest.mark.unit
def test_operations_doc_links_resolve() -> None:
    text = OPERATIONS_DOC.read_text(encoding="utf-8")
    headings = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}
    broken = sorted(set(re.findall(r"\]\(#([^)]+)\)", text)) - headings)
    assert not broken, f"docs/operations.md links to missing sections: {broken}"
    files = set(re.findall(r"`((?:systemd|deploy|examples)/[\w./@-]+)`", text))
    missing = sorted(f for f in files if not (ROOT / f).exists())
    assert not missing, f"docs/operations.md names files that do not exist: {missing}"


async def test_redis_roles_daemon_and_worker(acl_redis: Path, settings: Settings) -> None:
    """The daemon (user jlm) decides, the worker (user jlm-worker) runs its four scripts, and
    either one deletes the oldest terminal job of a scope past max_history_jobs; the worker cannot
    touch an idempotency record, send a cancel notice, or reach another key."""
    from jlm.keys import Keys, scope_tag
    from jlm.lifecycle import Context, Lifecycle
    from jlm.protocol import ManageRequest
    from jlm.store import Store, connect
    from jlm.worker.job import now
    from jlm.worker.store import Run, WorkerStore

    def url(user: str, password: str) -> str:
        return f"unix://{user}:{password}@{acl_redis}?db=0"

    keys = Keys("jlm")
    daemon = Store(connect(url("jlm", redis_password())), keys, Metrics())
    worker = Store(connect(url("jlm-worker", redis_password("worker"))), keys, Metrics())
    try:
        one_kept = settings.file.model_copy(update={"max_history_jobs": 1})
        lifecycle = Lifecycle(daemon, settings.model_copy(update={"file": one_kept}), Metrics())
        ws = WorkerStore(worker, 600, 60, 1)
        await daemon.ping_script()
        await worker.ping_script()  # readiness: result.lua, and every script loaded
        req = ManageRequest(job_type="t", payload={}, cache_prefix="p")
        job = (await lifecycle.manage(req, Context("r1", True, None))).reply["new_job_id"]
        facts = await ws.claim(job, "w1", now(), lease_ms=5000, max_attempts=1)
        assert facts.o == "claimed", facts.raw
        run = Run(job, "w1", int(facts.get("claim")))
        assert await ws.heartbeat(run, 5000) == "running"
        done = await ws.finish(
            run, ("p", "t"), "succeeded", now(), "1", result_ttl=60, max_attempts=1
        )
        assert (done.o, done.get("cached")) == ("succeeded", True), done.raw
        again = await lifecycle.manage(
            ManageRequest(job_type="t", payload={}, cache_prefix="p", policy="reuse"),
            Context("r2", True, None),
        )
        assert again.reply["success"] is True
        # The worker ends a second job of the scope: the first one goes (ZPOPMIN, DEL as
        # jlm-worker); the daemon supersedes a third: the second goes (as jlm).
        second = (await lifecycle.manage(req, Context("r3", True, None))).reply["new_job_id"]
        facts = await ws.claim(second, "w1", now(), lease_ms=5000, max_attempts=1)
        run = Run(second, "w1", int(facts.get("claim")))
        failed = await ws.finish(
            run, ("p", "t"), "failed", now(), "boom", result_ttl=60, max_attempts=1
        )
        assert failed.o == "failed", failed.raw
        assert await daemon.client.exists(keys.job(job), keys.history(job)) == 0
        third = (await lifecycle.manage(req, Context("r4", True, None))).reply["new_job_id"]
        await lifecycle.manage(req, Context("r5", True, None))
        assert await daemon.client.exists(keys.job(second), keys.history(second)) == 0
        assert await daemon.client.hget(keys.job(third), "state") == b"cancelled"

        tag = scope_tag("p", "t")
        client = worker.client
        write_request = "return redis.call('HSET', KEYS[1], 'f', 'x')"
        refused = [
            ("SET", keys.request(tag, None, "r9"), "forged"),
            ("GET", keys.request(tag, None, "r1")),
            ("DEL", keys.request(tag, None, "r1")),
            ("EVAL", write_request, "1", keys.request(tag, None, "r1")),
            ("PUBLISH", keys.cancel_channel, job),
            ("EVAL", "return redis.call('PUBLISH', 'jlm:cancel', 'x')", "0"),
            ("HGETALL", "other:key"),
            ("SCAN", "0"),
            ("FLUSHALL",),
        ]
        for command in refused:
            with pytest.raises(redis.exceptions.ResponseError):
                await client.execute_command(*command)
        async with client.pubsub() as pubsub:  # type: ignore[union-attr]
            await pubsub.subscribe(keys.cancel_channel)
    finally:
        await daemon.close()
        await worker.close()
