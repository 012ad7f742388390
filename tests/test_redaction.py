"""Redaction: one function hides every password, wherever a URL is shown.

The property tests build URLs with passwords in the user-info and in query parameters of every
spelling; the surface tests feed such URLs to each place that prints one (check-config, the
start-up log, the dependency-down warnings, /metrics, replies and events) and count the
password in what comes out: 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.amqp_helpers import read_stream
from tests.support.ports import free_port
from tests.support.services import RunningDaemon

from jlm.client import Client
from jlm.config import Settings, redact_url
from jlm.errors import InvalidRequest, Unavailable
from jlm.logs import JsonFormatter, TextFormatter
from jlm.worker import Job, Worker

ROOT = Path(__file__).resolve().parent.parent
SCHEMES = ("redis", "rediss", "unix", "amqp", "amqps")
# The five names the contract lists, in several cases, and longer names ending in one.
SECRET_NAMES = ("password", "PASSWORD", "Pass", "secret", "Token", "KEY", "ssl_password",
                "access-token", "api_key", "passwd")  # fmt: skip
PLAIN_NAMES = ("db", "heartbeat", "keyfile", "monkey", "passage", "name")
# Every generated secret starts with "ZQ"; nothing else in a generated URL holds a capital.
MARK = "ZQ"


def secret_text() -> st.SearchStrategy[str]:
    return st.text(max_size=16).map(lambda t: MARK + t)


def raw_query_value() -> st.SearchStrategy[str]:
    """A value as written without percent-encoding: anything a URL parser keeps in one value
    (no '&', '#', ',' or white space, which end it)."""
    chars = st.characters(
        blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters="&#,"
    )
    return st.text(chars, max_size=16).map(lambda t: MARK + t)


@st.composite
def url_with_secrets(draw: st.DrawFn) -> tuple[str, str, list[str]]:
    """(URL, the URL as it must be shown, the secrets as they appear in the URL)."""
    scheme = draw(st.sampled_from(SCHEMES))
    user = draw(st.from_regex(r"[a-z0-9._-]{0,8}", fullmatch=True))
    secrets: list[str] = []
    userinfo = hidden_userinfo = f"{user}@" if user else ""
    if draw(st.booleans()):
        password = quote(draw(secret_text()), safe="")
        secrets.append(password)
        userinfo, hidden_userinfo = f"{user}:{password}@", f"{user}:***@"
    if scheme == "unix":
        where = "/run/redis/redis.sock"
    else:
        where = draw(st.sampled_from(["127.0.0.1:6379", "h.example", "[::1]:5672"]))
        where += draw(st.sampled_from(["", "/", "/0", "/vhost"]))
    shown: list[str] = []
    hidden: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            name = draw(st.sampled_from(SECRET_NAMES))
            value = draw(
                st.one_of(secret_text().map(lambda t: quote(t, safe="")), raw_query_value())
            )
            secrets.append(value)
            shown.append(f"{name}={value}")
            hidden.append(f"{name}=***")
        else:
            name = draw(st.sampled_from(PLAIN_NAMES))
            plain = f"{name}={draw(st.from_regex(r'[a-z0-9]{0,6}', fullmatch=True))}"
            shown.append(plain)
            hidden.append(plain)
    query = ("?" + "&".join(shown)) if shown else ""
    hidden_query = ("?" + "&".join(hidden)) if hidden else ""
    return (
        f"{scheme}://{userinfo}{where}{query}",
        f"{scheme}://{hidden_userinfo}{where}{hidden_query}",
        secrets,
    )


@pytest.mark.unit
@given(st.lists(url_with_secrets(), min_size=1, max_size=3), st.sampled_from(["", "failed: "]))
def test_no_secret_survives_redaction(urls: list[tuple[str, str, list[str]]], before: str) -> None:
    text = before + ",".join(u for u, _, _ in urls) + (" (retrying)" if before else "")
    out = redact_url(text)
    assert out == before + ",".join(h for _, h, _ in urls) + (" (retrying)" if before else "")
    for _, _, secrets in urls:
        for secret in secrets:
            assert secret not in out
    assert MARK not in out
    assert redact_url(out) == out  # shown text stays as it is


@pytest.mark.unit
@given(st.lists(url_with_secrets(), min_size=1, max_size=3))
def test_no_secret_survives_in_quotes_or_brackets(urls: list[tuple[str, str, list[str]]]) -> None:
    """In an exception's repr, a list or a sentence, the secret goes (the punctuation that
    follows a value may go with it: a value ends only where a URL parser would end it)."""
    joined = ",".join(u for u, _, _ in urls)
    for text in (f"Error({joined!r})", f"[{joined!r}]", f"<{joined}>.", f"at {joined}: refused"):
        out = redact_url(text)
        assert MARK not in out, out


@pytest.mark.unit
def test_what_is_hidden_and_what_is_not() -> None:
    cases = {
        "redis://127.0.0.1:6379/0": "redis://127.0.0.1:6379/0",
        "redis://h/0?password=pw&db=1": "redis://h/0?password=***&db=1",
        "unix:///run/r.sock?db=0&password=pw": "unix:///run/r.sock?db=0&password=***",
        "unix://:pw@/run/r.sock": "unix://:***@/run/r.sock",
        "amqps://u@h/?Token=t#frag": "amqps://u@h/?Token=***#frag",
        "amqp://u:p@h/?heartbeat=5&keyfile=/k.pem&monkey=1": (
            "amqp://u:***@h/?heartbeat=5&keyfile=/k.pem&monkey=1"
        ),
        "redis://h:6379/0?password=a@b": "redis://h:6379/0?password=***",
        "amqp://u:p1@h1/?key=k,amqp://v:p2@h2/?secret=s": (
            "amqp://u:***@h1/?key=***,amqp://v:***@h2/?secret=***"
        ),
        "redis://h/0?password=": "redis://h/0?password=***",
    }
    for url, hidden in cases.items():
        assert redact_url(url) == hidden


# -- the surfaces ------------------------------------------------------------------------------


def secret() -> str:
    return f"pw{uuid.uuid4().hex}"


def amqp_url(port: int, pw: str, path: str = "/") -> str:
    """A broker URL with the password in the user-info and in five query-parameter spellings."""
    q = f"password={pw}&Pass={pw}&SECRET={pw}&token={pw}&Key={pw}"
    return f"amqp://jlm:{pw}@127.0.0.1:{port}{path}?{q}"


def redis_url(port: int, pw: str) -> str:
    """redis-py passes query parameters to the connection: only `password` is one of them."""
    return f"redis://jlm:{pw}@127.0.0.1:{port}/0?password={pw}"


def clean_env(**jlm: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "VIRTUAL_ENV")}
    return keep | {"PYTHONPATH": str(ROOT / "daemon"), "JLM_LOG_FORMAT": "json"} | jlm


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jlm", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.unit
@pytest.mark.parametrize("source", ["env", "file", "credential"])
def test_check_config_never_shows_a_password(source: str, tmp_path: Path) -> None:
    pw, second = secret(), secret()
    urls = {
        "amqp_url": f"{amqp_url(5672, pw)},{amqp_url(5673, second, '/v')}",
        "redis_url": redis_url(6379, pw),
    }
    if source == "env":
        env = clean_env(JLM_AMQP_URL=urls["amqp_url"], JLM_REDIS_URL=urls["redis_url"])
    else:
        for name, url in urls.items():
            (tmp_path / name).write_text(url + "\n")
        env = clean_env(CREDENTIALS_DIRECTORY=str(tmp_path))
        if source == "file":
            env = clean_env(
                JLM_AMQP_URL_FILE=str(tmp_path / "amqp_url"),
                JLM_REDIS_URL_FILE=str(tmp_path / "redis_url"),
            )
    for args in (("check-config",), ("check-config", "--json")):
        done = run_cli(env, *args)
        assert done.returncode == 0, done.stderr
        out = done.stdout + done.stderr
        assert out.count(pw) == 0
        assert out.count(second) == 0
        assert out.count("***") >= 13  # 2 + 5 + 5 + 1 + ... : each place it was
    shown = json.loads(done.stdout)
    assert shown["amqp_urls"][1] == (
        "amqp://jlm:***@127.0.0.1:5673/v?password=***&Pass=***&SECRET=***&token=***&Key=***"
    )
    # A configuration error next to them shows none either.
    bad = run_cli(env | {"JLM_PREFETCH": "x", "JLM_HEARTBEAT": f"{pw}"}, "check-config")
    assert bad.returncode == 78
    assert (bad.stdout + bad.stderr).count(pw) == 0


async def test_start_up_log_down_warnings_and_metrics_never_show_a_password(
    tmp_path: Path,
) -> None:
    """Broker and Redis on closed ports: the daemon says where it connects, that both are
    down and serves /metrics, all without the password."""
    pw = secret()
    closed = free_port()
    env = clean_env(
        JLM_AMQP_URL=amqp_url(closed, pw),
        JLM_REDIS_URL=redis_url(closed, pw),
        JLM_METRICS_ADDR="127.0.0.1:0",
        JLM_LOG_LEVEL="DEBUG",
        JLM_RETRY_MAX_DELAY="0.2",
    )
    err_path = tmp_path / "stderr"
    with err_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jlm", "run", env=env, stdout=err, stderr=err, cwd=tmp_path
        )
        try:
            port = None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                text = err_path.read_text(errors="replace")
                found = re.search(r"metrics and health on http://[^:]+:(\d+)", text)
                port = int(found.group(1)) if found else None
                if port and "rabbitmq is down" in text and "redis is down" in text:
                    break
                assert proc.returncode is None, text
                await asyncio.sleep(0.1)
            assert port is not None
            bodies = []
            for path in ("/metrics", "/healthz", "/readyz"):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
                )
                bodies.append((await reader.read()).decode())
                writer.close()
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
    logs = [json.loads(line) for line in err_path.read_text().splitlines() if line.strip()]
    msgs = [e["msg"] for e in logs]
    starting = next(m for m in msgs if "starting: broker" in m)
    assert f"127.0.0.1:{closed}/?password=***&Pass=***&SECRET=***&token=***&Key=***" in starting
    assert f"redis://jlm:***@127.0.0.1:{closed}/0?password=***" in starting
    assert any(m.startswith("rabbitmq is down") for m in msgs)
    assert any(m.startswith("redis is down") for m in msgs)
    assert "jlm_dependency_up" in bodies[0]
    everything = err_path.read_text() + "".join(bodies)
    assert everything.count(pw) == 0


@pytest.mark.unit
def test_log_records_errors_and_exceptions_hide_passwords() -> None:
    pw = secret()
    url = amqp_url(1, pw)
    try:
        raise ConnectionError(f"cannot reach {url}")
    except ConnectionError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("jlm", logging.ERROR, __file__, 1, "down: %s", (url,), exc_info)
    for formatter in (JsonFormatter(), TextFormatter()):
        assert formatter.format(record).count(pw) == 0
    for error in (InvalidRequest(f"bad {url}"), Unavailable(f"redis: {redis_url(1, pw)}", "redis")):
        assert pw not in error.message
        assert pw not in str(error)


async def test_replies_and_events_never_show_a_password(
    daemon: RunningDaemon, client: Client, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A rejected request that quotes a URL and a job whose handler fails with one: the
    reply, `status`, the events, /metrics and the log records hold no password (the records
    as any formatter shows them: a worker embedded in an application logs through its own)."""
    caplog.set_level(logging.INFO)
    pw = secret()
    url = amqp_url(5672, pw)
    rejected = await client.call(
        "manage",
        {"job_type": "redact", "cache_prefix": "r", "payload": {}, "requested_at": url[:60]},
    )
    assert rejected["success"] is False
    assert rejected["error"]["code"] == "invalid_request"
    assert "requested_at" in rejected["error"]["message"]

    async def handle(job: Job) -> None:
        raise ConnectionError(f"cannot reach {job.payload['url']}")

    worker = Worker(settings, handle, "redact", concurrency=1)
    running = asyncio.create_task(worker.run())
    try:
        while not worker.started.is_set():
            assert not running.done()
            await asyncio.sleep(0.05)
        reply = await client.call(
            "manage", {"job_type": "redact", "cache_prefix": "w", "payload": {"url": url}}
        )
        job_id = reply["new_job_id"]
        for _ in range(200):
            status = await client.call("status", {"job_id": job_id})
            if status["state"] == "failed":
                break
            await asyncio.sleep(0.05)
        assert status["state"] == "failed", status
        assert "ConnectionError: cannot reach amqp://jlm:***@" in status["error"]
    finally:
        worker.stop()
        await asyncio.wait_for(running, 20)
    events = await read_stream(settings)
    types = {e["type"] for e in events}
    assert {"request.rejected", "job.failed"} <= types, types
    # The payload itself is the publisher's data, stored as sent; everything else is shown.
    shown = [e for e in events if e["type"] != "job.enqueued"]
    text = orjson.dumps(shown).decode() + orjson.dumps([rejected, status]).decode()
    assert text.count(pw) == 0
    assert "***" in text
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.service.http.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    metrics = (await reader.read()).decode()
    writer.close()
    assert "jlm_requests_total" in metrics
    assert metrics.count(pw) == 0
    assert "cannot reach amqp://jlm:***@" in caplog.text  # the worker's "attempt 1 failed" line
    assert caplog.text.count(pw) == 0
