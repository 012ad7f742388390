"""Settings: environment parsing, secrets from files, the TOML file, grants. Pure logic.

The tables below hold one row per setting and per key of the configuration file; a test fails
when a setting has no row, so a new setting cannot be added without its cases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jlm.config import (
    ENV_SETTINGS,
    ConfigError,
    FileConfig,
    Settings,
    UserGrant,
    env_name,
    load,
    load_settings,
    redact_url,
)

pytestmark = pytest.mark.unit

# A readable file for the settings that name one (TLS files, JLM_CONFIG); written by `paths`.
READABLE = "@readable@"


@dataclass(frozen=True)
class Row:
    """A setting: a valid raw value and what it becomes, and an invalid raw value."""

    name: str
    valid: str
    expected: Any
    invalid: str


SETTINGS = [
    Row("amqp_url", "amqps://u:p@h:5671/v", "amqps://u:p@h:5671/v", "http://h/"),
    Row("redis_url", "unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2", "memcached://h"),
    Row("config", READABLE, READABLE, "/nonexistent/jlm.toml"),
    Row("metrics_addr", "0.0.0.0:9000", "0.0.0.0:9000", "9464"),
    Row("redis_namespace", "ns.1", "ns.1", "a:{b}"),
    Row("redis_cluster", "true", True, "maybe"),
    Row("redis_max_connections", "8", 8, "0"),
    Row("prefetch", "10", 10, "lots"),
    Row("shutdown_timeout", "2.5", 2.5, "0"),
    Row("log_level", "debug", "DEBUG", "LOUD"),
    Row("log_format", "JSON", "json", "xml"),
    Row("tls_ca_file", READABLE, READABLE, "/nonexistent/ca.pem"),
    Row("tls_cert_file", READABLE, READABLE, "/nonexistent/client.crt"),
    Row("tls_key_file", READABLE, READABLE, "/"),
    Row("tls_verify", "false", False, "perhaps"),
    Row("provenance_max_age", "12h", "12h", "a week"),
    Row("provenance_max_bytes", "1000", 1000, "-1"),
    Row("requests_queue_type", "quorum", "quorum", "stream"),
    Row("requests_delivery_limit", "5", 5, "0"),
    Row("heartbeat", "0", 0, "601"),
    Row("retry_max_delay", "0.5", 0.5, "0"),
    Row("lease_seconds", "30", 30.0, "-3"),
    Row("watchdog_unready_limit", "60", 60.0, "0"),
    Row("worker_metrics_addr", "127.0.0.1:9465", "127.0.0.1:9465", "nowhere"),
    Row("worker_shutdown_timeout", "0", 0.0, "-1"),
]
BY_NAME = {row.name: row for row in SETTINGS}

# A key of the configuration file: a valid TOML value, what it becomes, an invalid TOML value.
FILE_KEYS = [
    Row("max_request_bytes", "2048", 2048, "-1"),
    Row("idempotency_ttl", "60", 60, "0"),
    Row("allow_any_job_type", "false", False, '"maybe"'),
    Row("job_ttl", "60", 60, "0"),
    Row("terminal_ttl", "60", 60, "-5"),
    Row("max_history_jobs", "10", 10, "0"),
    Row("default_result_ttl", "60", 60, "1.5"),
    Row("max_job_types", "5", 5, "0"),
    Row("max_clock_skew", "60", 60.0, "-1"),
    Row("dead_letter_max_bytes", "4096", 4096, "-1"),
    Row("dead_letter_max_length_bytes", "65536", 65536, "0"),
    Row("job_types", '{ "a.b" = { policy = "skip" } }', {"a.b"}, '{ "bad:name" = {} }'),
    Row("auth", "{ enabled = true }", True, "{ enabled = true, users = { u = { x = 1 } } }"),
]


def _real(value: Any, readable: Path) -> Any:
    return readable if value == READABLE else value


def _raw(value: str, readable: Path) -> str:
    return str(readable) if value == READABLE else value


@pytest.fixture
def readable(tmp_path: Path) -> Path:
    path = tmp_path / "readable.toml"
    path.write_text("# an empty configuration file is a valid one\n")
    return path


def test_every_setting_and_file_key_has_a_row() -> None:
    assert [row.name for row in SETTINGS] == list(ENV_SETTINGS)
    assert [row.name for row in FILE_KEYS] == list(FileConfig.model_fields)


@pytest.mark.parametrize("row", SETTINGS, ids=lambda r: r.name)
def test_each_setting_unset_empty_valid_invalid(row: Row, readable: Path) -> None:
    var = env_name(row.name)
    default = Settings.model_fields[row.name].get_default(call_default_factory=True)
    for env in ({}, {var: ""}, {var: "  \t"}):
        loaded = load(env)
        assert getattr(loaded.settings, row.name) == default, env
        assert loaded.sources[row.name].kind == "default"
    loaded = load({var: _raw(row.valid, readable)})
    assert getattr(loaded.settings, row.name) == _real(row.expected, readable)
    assert (loaded.sources[row.name].kind, loaded.sources[row.name].origin) == ("env", var)
    with pytest.raises(ConfigError) as caught:
        load({var: row.invalid})
    # The message starts with the variable's name and fits on one line.
    assert str(caught.value).startswith(f"{var}: "), caught.value
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("row", FILE_KEYS, ids=lambda r: r.name)
def test_each_file_key_absent_valid_invalid(row: Row, tmp_path: Path) -> None:
    path = tmp_path / "jlm.toml"
    path.write_text("")
    loaded = load({"JLM_CONFIG": str(path)})
    assert getattr(loaded.settings.file, row.name) == getattr(FileConfig(), row.name)
    assert loaded.sources[row.name].kind == "default"
    path.write_text(f"{row.name} = {row.valid}\n")
    loaded = load({"JLM_CONFIG": str(path)})
    value = getattr(loaded.settings.file, row.name)
    if row.name == "job_types":
        value = set(value)
    elif row.name == "auth":
        value = value.enabled
    assert value == row.expected
    assert (loaded.sources[row.name].kind, loaded.sources[row.name].origin) == ("file", str(path))
    path.write_text(f"{row.name} = {row.invalid}\n")
    with pytest.raises(ConfigError, match=rf"^JLM_CONFIG \({re.escape(str(path))}\): {row.name}"):
        load({"JLM_CONFIG": str(path)})


@pytest.mark.parametrize("name", ["amqp_url", "redis_url"])
def test_secrets_from_file_and_credential(name: str, tmp_path: Path) -> None:
    var, valid = env_name(name), BY_NAME[name].valid
    secret = tmp_path / "secret"
    secret.write_text(f"\n  {valid}\n")
    loaded = load({f"{var}_FILE": str(secret), var: "ignored://"})
    assert getattr(loaded.settings, name) == valid
    assert loaded.sources[name].kind == "file"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / name).write_text(valid)
    loaded = load({"CREDENTIALS_DIRECTORY": str(creds), var: "ignored://"})
    assert getattr(loaded.settings, name) == valid
    assert str(loaded.sources[name]) == f"credential $CREDENTIALS_DIRECTORY/{name}"
    # An empty JLM_*_FILE or CREDENTIALS_DIRECTORY is unset: the variable, then the default.
    loaded = load({f"{var}_FILE": "", "CREDENTIALS_DIRECTORY": "", var: valid})
    assert (getattr(loaded.settings, name), loaded.sources[name].kind) == (valid, "env")
    assert load({f"{var}_FILE": " "}).sources[name].kind == "default"
    # A credential directory without this credential falls through to the variable.
    (creds / name).unlink()
    assert load({"CREDENTIALS_DIRECTORY": str(creds)}).sources[name].kind == "default"
    # What a file holds is validated like the variable, and the error names both.
    secret.write_text(BY_NAME[name].invalid)
    with pytest.raises(ConfigError, match=rf"^{var} \(from {var}_FILE={re.escape(str(secret))}\)"):
        load({f"{var}_FILE": str(secret)})
    (creds / name).write_text(BY_NAME[name].invalid)
    with pytest.raises(ConfigError, match=rf"^{var} \(from \$CREDENTIALS_DIRECTORY/{name}\)"):
        load({"CREDENTIALS_DIRECTORY": str(creds)})


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read .*: No such file or directory"),
        ("dir", "cannot read .*: Is a directory"),
        (b"\xff\xfeamqp://h/", r"is not UTF-8 \(byte 0xff at offset 0\)"),
        (b"  \n", "is empty"),
        (b"x" * (64 * 1024 + 1), "is larger than"),
    ],
)
@pytest.mark.parametrize("via", ["file", "credential"])
def test_bad_secret_files_name_the_setting(
    content: bytes | str | None, problem: str, via: str, tmp_path: Path
) -> None:
    path = tmp_path / "amqp_url"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    if via == "file":
        env, name = {"JLM_AMQP_URL_FILE": str(path)}, "JLM_AMQP_URL_FILE"
    else:
        if content is None:
            return  # a missing credential is not set: covered above
        env, name = {"CREDENTIALS_DIRECTORY": str(tmp_path)}, r"\$CREDENTIALS_DIRECTORY/amqp_url"
    with pytest.raises(ConfigError, match=rf"^{name}: .*{problem}"):
        load(env)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read .*: No such file or directory"),
        ("dir", "cannot read .*: Is a directory"),
        (b"max_job_types = 5\n# \xe9t\xe9\n", r"is not UTF-8 \(byte 0xe9 at offset 20\)"),
        (b"nonsense = [\n", "is not valid TOML"),
        (b"a = " + b"[" * 100_000 + b"]" * 100_000, "is not valid TOML"),
        (b"\x00\x01", "is not valid TOML"),
        (b"unknown_key = 1\n", "unknown_key: Extra inputs are not permitted"),
    ],
)
def test_bad_config_files_name_the_file(
    content: bytes | str | None, problem: str, tmp_path: Path
) -> None:
    path = tmp_path / "jlm.toml"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"^JLM_CONFIG.*{problem}") as caught:
        load({"JLM_CONFIG": str(path)})
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_explicit_mapping_never_reads_the_process_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, readable: Path
) -> None:
    """Every setting set, valid and not its default, in os.environ; none may reach settings
    built from a mapping, and all of them reach settings built from the environment."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "redis_url").write_text("redis://cred-host:6379/3")
    (tmp_path / "amqp").write_text("amqp://file-host/")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("JLM_AMQP_URL_FILE", str(tmp_path / "amqp"))
    for row in SETTINGS:
        monkeypatch.setenv(env_name(row.name), _raw(row.valid, readable))
    defaults = Settings()
    assert load_settings({}) == defaults
    assert all(source.kind == "default" for source in load({}).sources.values())
    only = load_settings({"JLM_PREFETCH": "9"})
    assert only == defaults.model_copy(update={"prefetch": 9})
    # The same variables do arrive when the environment is what is read.
    from_env = load(None)
    for row in SETTINGS:
        if row.name not in ("amqp_url", "redis_url"):
            assert getattr(from_env.settings, row.name) == _real(row.expected, readable)
    assert from_env.settings.amqp_url == "amqp://file-host/"
    assert from_env.settings.redis_url == "redis://cred-host:6379/3"
    assert from_env.settings != defaults


def test_unknown_variables_are_reported_not_used() -> None:
    loaded = load({"JLM_PREFECH": "9", "JLM_AMQP_URL_FILE": "", "OTHER": "x"})
    assert loaded.ignored == ("JLM_PREFECH",)
    assert loaded.settings.prefetch == 256


def test_defaults_follow_the_contract() -> None:
    s = load_settings({})
    assert s.amqp_urls == ["amqp://guest:guest@localhost:5672/"]
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.config is None
    assert s.metrics_addr == "127.0.0.1:9464"
    assert s.redis_namespace == "jlm"
    assert s.redis_cluster is False
    assert s.file.max_request_bytes == 1048576
    assert s.file.idempotency_ttl == 86400
    assert s.file.allow_any_job_type is True
    assert s.shutdown_timeout == 15


def test_several_broker_urls() -> None:
    s = load_settings({"JLM_AMQP_URL": "amqp://a:5672/, amqps://b:5671/"})
    assert s.amqp_urls == ["amqp://a:5672/", "amqps://b:5671/"]


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"JLM_PREFETCH": "0"}, "JLM_PREFETCH"),
        ({"JLM_REDIS_CLUSTER": "maybe"}, "JLM_REDIS_CLUSTER"),
        ({"JLM_METRICS_ADDR": "9464"}, "JLM_METRICS_ADDR"),
        ({"JLM_REDIS_NAMESPACE": "a:{b}"}, "JLM_REDIS_NAMESPACE"),
        ({"JLM_AMQP_URL": "http://x"}, "JLM_AMQP_URL"),
        ({"JLM_REDIS_URL": "memcached://x"}, "JLM_REDIS_URL"),
        ({"JLM_TLS_CA_FILE": "/nonexistent/ca.pem"}, "JLM_TLS_CA_FILE"),
        ({"JLM_PROVENANCE_MAX_AGE": "a week"}, "JLM_PROVENANCE_MAX_AGE"),
    ],
)
def test_bad_settings_name_themselves(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        load_settings(env)


def test_secrets_from_files_and_credentials(tmp_path: Path) -> None:
    (tmp_path / "amqp").write_text("\n amqp://u:pw1@h:5672/v \n")
    s = load_settings(
        {"JLM_AMQP_URL": "amqp://ignored/", "JLM_AMQP_URL_FILE": str(tmp_path / "amqp")}
    )
    assert s.amqp_url == "amqp://u:pw1@h:5672/v"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "redis_url").write_text("redis://:pw2@h:6379/1\n")
    s = load_settings({"CREDENTIALS_DIRECTORY": str(creds)})
    assert s.redis_url == "redis://:pw2@h:6379/1"
    assert s.amqp_url == "amqp://guest:guest@localhost:5672/"


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "jlm.toml"
    path.write_text("""
max_request_bytes = 2048
allow_any_job_type = false
[job_types."report.render"]
queue = "reports"
policy = "skip"
result_ttl = 60
max_attempts = 3
[auth]
enabled = true
[auth.users."publisher-a"]
prefixes = ["tenant-a", "tenant-a-*"]
job_types = ["*"]
operations = ["manage"]
""")
    f = load_settings({"JLM_CONFIG": str(path)}).file
    assert f.max_request_bytes == 2048
    assert f.job_type("other") is None
    jt = f.job_type("report.render")
    assert jt is not None
    assert (jt.policy, jt.result_ttl, jt.max_attempts) == ("skip", 60, 3)
    assert f.queue_for("report.render") == "reports"
    assert f.auth.users["publisher-a"].allows("manage", "tenant-a-eu", "x")
    path.write_text('[job_types."bad:name"]\n')
    with pytest.raises(ConfigError, match="job_types"):
        load_settings({"JLM_CONFIG": str(path)})
    path.write_text("max_request_bytes = -1\n")
    with pytest.raises(ConfigError, match="max_request_bytes"):
        load_settings({"JLM_CONFIG": str(path)})
    path.write_text("nonsense = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({"JLM_CONFIG": str(path)})


def test_grants_match_whole_names() -> None:
    g = UserGrant(
        prefixes=("tenant-a", "tenant-a-*"),
        job_types=("report.*",),
        operations=("manage", "status"),
    )
    assert g.allows("manage", "tenant-a", "report.render")
    assert g.allows("status", "tenant-a-eu", "report.pdf")
    assert not g.allows("manage", "tenant-ab", "report.render")
    assert not g.allows("manage", "xtenant-a", "report.render")
    assert not g.allows("cancel", "tenant-a", "report.render")
    assert not g.allows("manage", "tenant-a", "export.csv")


@given(st.text(min_size=1, max_size=30).filter(lambda p: "@" not in p and "/" not in p))
def test_redaction_hides_any_password(password: str) -> None:
    url = f"amqp://user:{password}@host:5672/vhost"
    assert redact_url(url) == "amqp://user:***@host:5672/vhost"
    assert redact_url(f"failed to reach {url} twice") == (
        "failed to reach amqp://user:***@host:5672/vhost twice"
    )
