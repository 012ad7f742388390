"""Bad input: a clear error, a dead letter with the reason, an event, and nothing else changes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from tests.amqp_helpers import drain_queue, queue_exists, read_stream
from tests.support.services import RunningDaemon, start_daemon

from jlm.client import Client
from jlm.config import Settings

CORPUS: list[tuple[str, str, bytes, str]] = [
    ("not-json", "manage", b"hello", "invalid_request"),
    ("not-utf8", "manage", b'{"job_type": "\xff", "payload": {}}', "invalid_request"),
    ("wrong-type", "manage", b'{"job_type": 5, "payload": {}}', "invalid_request"),
    ("payload-list", "manage", b'{"job_type": "bad1", "payload": []}', "invalid_request"),
    (
        "priority-0",
        "manage",
        b'{"job_type": "bad2", "payload": {}, "priority": 0}',
        "invalid_request",
    ),
    (
        "priority-11",
        "manage",
        b'{"job_type": "bad3", "payload": {}, "priority": 11}',
        "invalid_request",
    ),
    ("colon", "manage", b'{"job_type": "a:b", "payload": {}}', "invalid_request"),
    (
        "brace",
        "manage",
        b'{"job_type": "bad4", "cache_prefix": "{x}", "payload": {}}',
        "invalid_request",
    ),
    (
        "star",
        "manage",
        b'{"job_type": "bad5", "cache_prefix": "*", "payload": {}}',
        "invalid_request",
    ),
    ("question", "manage", b'{"job_type": "bad6?", "payload": {}}', "invalid_request"),
    ("nan", "manage", b'{"job_type": "bad7", "payload": {"x": NaN}}', "invalid_request"),
    (
        "duplicate",
        "manage",
        b'{"job_type": "bad8", "job_type": "x", "payload": {}}',
        "invalid_request",
    ),
    (
        "deep",
        "manage",
        b'{"job_type": "bad9", "payload": ' + b'{"a":' * 40 + b"1" + b"}" * 40 + b"}",
        "invalid_request",
    ),
    (
        "oversized",
        "manage",
        b'{"job_type": "bad10", "payload": {"b": "' + b"x" * 1_048_600 + b'"}}',
        "payload_too_large",
    ),
    ("unknown-op", "launch", b'{"job_type": "bad11", "payload": {}}', "unsupported_operation"),
    ("empty", "manage", b"", "invalid_request"),
]


async def test_bad_input_corpus(
    daemon: RunningDaemon,
    client: Client,
    settings: Settings,
    redis_client: aioredis.Redis,
    namespace: str,
) -> None:
    for name, op, body, code in CORPUS:
        reply = await client.call(op, body, message_id=f"bad-{name}")
        assert reply["success"] is False, name
        assert reply["error"]["code"] == code, (name, reply)
        assert reply["error"]["message"], name
    # Nothing written to Redis, no job queue declared.
    assert [k async for k in redis_client.scan_iter(match=f"{namespace}:*")] == []
    for i in range(1, 12):
        assert not await queue_exists(settings, f"jlm.jobs.bad{i}")
    # Every one is dead-lettered with its reason and its body, intact up to
    # dead_letter_max_bytes (1 MiB), beyond that cut and marked.
    dead = await drain_queue(settings, "jlm.dead")
    by_id = {m.message_id: m for m in dead}
    keep = settings.file.dead_letter_max_bytes
    for name, op, body, code in CORPUS:
        msg = by_id[f"bad-{name}"]
        assert msg.body == body[:keep], name
        assert msg.headers.get("x-jlm-truncated") is (True if len(body) > keep else None), name
        assert msg.headers["x-jlm-error"] == code
        assert msg.headers["x-jlm-operation"] == op
    events = [e for e in await read_stream(settings) if e["type"] == "request.rejected"]
    assert {e["request_id"] for e in events} == {f"bad-{n}" for n, *_ in CORPUS}
    assert all(e["status"] == "rejected" for e in events)
    # And the daemon keeps serving.
    ok = await client.call("manage", {"job_type": "demo", "payload": {}})
    assert ok["success"] is True
    assert daemon.service.health.ready


async def test_rejections_are_counted(daemon: RunningDaemon, client: Client) -> None:
    await client.call("manage", b"nope")
    await client.call("frobnicate", b"{}")
    m = daemon.service.metrics
    assert m.requests.labels(op="manage", outcome="rejected")._value.get() == 1
    assert m.requests.labels(op="unknown", outcome="rejected")._value.get() == 1
    assert m.dead_lettered.labels(code="invalid_request")._value.get() == 1


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str) -> Path:
        path = tmp_path / "jlm.toml"
        path.write_text(text)
        return path

    return write


async def test_unknown_job_type_with_a_restricted_list(
    make_settings: Callable[..., Settings],
    config_file: Callable[[str], Path],
    redis_client: aioredis.Redis,
    namespace: str,
) -> None:
    path = config_file("""
allow_any_job_type = false
[job_types."report.render"]
queue = "reports"
policy = "skip"
""")
    settings = make_settings(JLM_CONFIG=str(path))
    running = await start_daemon(settings)
    try:
        async with Client(settings) as client:
            bad = await client.call("manage", {"job_type": "other", "payload": {}})
            assert bad["error"]["code"] == "unknown_job_type"
            assert [k async for k in redis_client.scan_iter(match=f"{namespace}:*")] == []
            first = await client.call("manage", {"job_type": "report.render", "payload": {}})
            second = await client.call("manage", {"job_type": "report.render", "payload": {}})
            assert second["deduplicated"] is True  # the type's default policy is skip
            assert second["new_job_id"] == first["new_job_id"]
            jobs = await drain_queue(settings, "reports")
            assert [orjson.loads(m.body)["job_id"] for m in jobs] == [first["new_job_id"]]
    finally:
        await running.stop()


async def test_requested_at_far_ahead_is_invalid_and_a_little_ahead_is_accepted(
    daemon: RunningDaemon,
    client: Client,
    settings: Settings,
    redis_client: aioredis.Redis,
    namespace: str,
) -> None:
    """A year-9999 requested_at would make every later request of its scope stale for good."""
    future = {"job_type": "skew", "cache_prefix": "far", "payload": {}}
    reply = await client.call("manage", future | {"requested_at": "9999-12-31T23:59:59Z"})
    assert reply["error"]["code"] == "invalid_request"
    assert "max_clock_skew" in reply["error"]["message"]
    assert [k async for k in redis_client.scan_iter(match=f"{namespace}:*")] == []
    ahead = (datetime.now(UTC) + timedelta(seconds=60)).isoformat()
    accepted = await client.call("manage", future | {"requested_at": ahead})
    assert accepted["success"] is True
    assert accepted["deduplicated"] is False
    dead = await drain_queue(settings, "jlm.dead")
    assert [m.headers["x-jlm-error"] for m in dead] == ["invalid_request"]
