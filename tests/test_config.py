"""Settings: environment parsing, secrets from files, the TOML file, grants. Pure logic."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jlm.config import ConfigError, UserGrant, load_settings, redact_url


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
