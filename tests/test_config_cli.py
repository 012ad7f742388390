"""`jlm check-config`, `jlm run` and `jlm worker` as an operator runs them: every bad setting or
file exits 78 with one line naming it, never a traceback; check-config shows every setting with
its value and source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.test_config import FILE_KEYS, READABLE, SETTINGS, Row

from jlm.config import ENV_SETTINGS, env_name

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
EX_CONFIG = 78


def jlm(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m jlm ARGS` with only these settings: nothing of the test's environment."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "VIRTUAL_ENV")}
    return subprocess.run(
        [sys.executable, "-m", "jlm", *args],
        env=keep | {"PYTHONPATH": str(ROOT / "daemon"), "JLM_METRICS_ADDR": "127.0.0.1:0"} | env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


COMMANDS = [
    ("check-config",),
    ("run",),
    ("worker", "tests.worker_handlers:count", "--job-type", "demo"),
]


def assert_config_error(done: subprocess.CompletedProcess[str], name: str) -> None:
    assert done.returncode == EX_CONFIG, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"jlm: configuration error: {name}"), line


@pytest.mark.parametrize("row", SETTINGS, ids=lambda r: r.name)
def test_an_invalid_setting_exits_78_naming_it(row: Row) -> None:
    commands = COMMANDS if row.name in ("prefetch", "config") else COMMANDS[:2]
    for command in commands:
        assert_config_error(jlm(*command, **{env_name(row.name): row.invalid}), env_name(row.name))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read"),
        ("dir", "Is a directory"),
        (b"\xff\xfe[", "is not UTF-8"),
        (b"max_job_types = [\n", "is not valid TOML"),
        (b"a = " + b"[" * 100_000 + b"]" * 100_000, "is not valid TOML"),
        (b'[job_types."a"]\npolicy = "newest"\n', "job_types.a.policy"),
    ],
)
def test_a_bad_config_file_exits_78_naming_it(
    content: bytes | str | None, problem: str, tmp_path: Path
) -> None:
    path = tmp_path / "jlm.toml"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    for command in COMMANDS:
        done = jlm(*command, JLM_CONFIG=str(path))
        assert_config_error(done, "JLM_CONFIG")
        assert str(path) in done.stderr
        assert problem in done.stderr


@pytest.mark.parametrize(
    ("where", "content"),
    [("file", None), ("file", b"\xffamqp://h/"), ("file", b"\n"), ("credential", b"\xc3(")],
)
def test_a_bad_secret_file_exits_78_naming_it(
    where: str, content: bytes | None, tmp_path: Path
) -> None:
    path = tmp_path / "amqp_url"
    if content is not None:
        path.write_bytes(content)
    if where == "file":
        env, name = {"JLM_AMQP_URL_FILE": str(path)}, "JLM_AMQP_URL_FILE"
    else:
        env, name = {"CREDENTIALS_DIRECTORY": str(tmp_path)}, "$CREDENTIALS_DIRECTORY/amqp_url"
    for command in COMMANDS[:2]:
        assert_config_error(jlm(*command, **env), name)


def test_empty_variables_are_unset() -> None:
    """What a systemd EnvironmentFile with every line `JLM_X=` gives: the defaults, exit 0."""
    empty = {env_name(n): "" for n in ENV_SETTINGS}
    empty |= {"JLM_AMQP_URL_FILE": "", "JLM_REDIS_URL_FILE": "", "CREDENTIALS_DIRECTORY": ""}
    done = jlm("check-config", "--json", **empty)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert {k: v["source"] for k, v in shown["sources"].items()} == dict.fromkeys(
        [*ENV_SETTINGS, *(row.name for row in FILE_KEYS)], "default"
    )
    assert shown["config"] is None
    assert shown["tls_ca_file"] is None
    text = jlm("check-config", **empty)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[-1] == "configuration OK"


def test_check_config_shows_every_setting_with_its_source(tmp_path: Path) -> None:
    readable = tmp_path / "jlm.toml"
    readable.write_text("".join(f"{row.name} = {row.valid}\n" for row in FILE_KEYS))
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "redis_url").write_text("redis://:pw@cred-host:6379/3\n")
    (tmp_path / "amqp").write_text("amqp://u:pw@file-host/\n")
    env = {
        env_name(row.name): str(readable) if row.valid == READABLE else row.valid
        for row in SETTINGS
    }
    env |= {"CREDENTIALS_DIRECTORY": str(creds), "JLM_AMQP_URL_FILE": str(tmp_path / "amqp")}
    env |= {"JLM_NOT_A_SETTING": "1"}
    done = jlm("check-config", "--json", **env)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    expected_sources = dict.fromkeys(ENV_SETTINGS, "env") | dict.fromkeys(
        (row.name for row in FILE_KEYS), "file"
    )
    expected_sources |= {"amqp_url": "file", "redis_url": "credential"}
    assert {k: v["source"] for k, v in shown["sources"].items()} == expected_sources
    assert shown["sources"]["amqp_url"]["origin"] == f"JLM_AMQP_URL_FILE={tmp_path / 'amqp'}"
    assert shown["amqp_url"] == "amqp://u:***@file-host/"
    assert shown["redis_url"] == "redis://:***@cred-host:6379/3"
    for row in SETTINGS:
        if row.name not in ("amqp_url", "redis_url"):
            want = str(readable) if row.expected == READABLE else row.expected
            assert shown[row.name] == want, row.name
    assert shown["max_request_bytes"] == 2048
    assert shown["job_types"]["a.b"]["policy"] == "skip"
    assert shown["auth"]["enabled"] is True
    assert shown["ignored"] == ["JLM_NOT_A_SETTING"]
    text = jlm("check-config", **env)
    assert text.returncode == 0, text.stderr
    rows = {line.split()[0]: line.split()[1] for line in text.stdout.splitlines()[:-1]}
    for name in ENV_SETTINGS:
        assert rows[env_name(name)] == expected_sources[name], name
    assert rows["max_request_bytes"] == "file"
    assert rows['job_types."a.b"'] == "file"
    assert rows["auth.enabled"] == "file"
    assert "JLM_NOT_A_SETTING is not a setting" in text.stderr
