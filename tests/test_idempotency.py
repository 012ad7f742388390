"""Idempotency through the running daemon: one decision, one job message and one event per request;
another request under the same key refused; keys never cross actors or scopes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from tests.amqp_helpers import drain_queue, read_stream
from tests.support.services import RunningDaemon, start_daemon
from tests.test_security import AuthSetup, auth, client_as, scope_keys, snapshot

import jlm.keys
from jlm.client import Client
from jlm.config import Settings
from jlm.keys import scope_tag

__all__ = ["auth"]  # the fixture, shared with the security tests

pytestmark = pytest.mark.timeout(120)


def manage(prefix: str = "p", **extra: Any) -> dict[str, Any]:
    return {"job_type": "demo", "payload": {"n": 1}, "cache_prefix": prefix, **extra}


def decisions_of(events: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e["request_id"] == request_id and e["type"].startswith("job.")]


async def test_same_request_twice_is_one_job_message_and_one_event(
    daemon: RunningDaemon, client: Client, settings: Settings
) -> None:
    # Sequentially.
    first = await client.call("manage", manage("seq"), message_id="seq-1")
    again = await client.call("manage", manage("seq"), message_id="seq-1")
    # Back to back: both in flight at once.
    futures = [
        await client.send("manage", manage("b2b"), message_id="b2b-1"),
        await client.send("manage", manage("b2b"), message_id="b2b-1"),
    ]
    b2b = [await asyncio.wait_for(f, 30) for f in futures if f is not None]
    assert again == first
    assert b2b[0] == b2b[1]
    jobs = [m.message_id for m in await drain_queue(settings, "jlm.jobs.demo")]
    assert sorted(jobs) == sorted([first["new_job_id"], b2b[0]["new_job_id"]])
    events = await read_stream(settings)
    assert [e["type"] for e in decisions_of(events, "seq-1")] == ["job.enqueued"]
    assert [e["type"] for e in decisions_of(events, "b2b-1")] == ["job.enqueued"]
    print(
        f"same request twice: sequential replies equal={again == first}, back-to-back replies "
        f"equal={b2b[0] == b2b[1]}; job messages {len(jobs)} for 2 requests; events "
        f"{len(decisions_of(events, 'seq-1'))} + {len(decisions_of(events, 'b2b-1'))}"
    )
    m = daemon.service.metrics
    assert m.jobs_enqueued.labels(job_type="demo", priority="5")._value.get() == 2


async def test_another_request_under_a_key_is_refused_and_changes_nothing(  # noqa: PLR0917 - fixtures arrive as parameters
    daemon: RunningDaemon,
    client: Client,
    settings: Settings,
    redis_client: aioredis.Redis,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    first = await client.call("manage", manage(), message_id="k-1")
    job = first["new_job_id"]
    _, result_key = scope_keys(namespace, "p", "demo")
    await redis_client.hset(result_key, mapping={"job": job, "value": b'{"v": 1}', "at": "t"})
    before = await snapshot(redis_client, namespace)
    attempts = [
        ("manage", orjson.dumps(manage(payload={"n": 2}))),  # another body
        ("manage", orjson.dumps(manage("q"))),  # another scope
        ("cancel", orjson.dumps({"job_id": job})),  # another operation
        ("invalidate", orjson.dumps({"job_type": "demo", "cache_prefix": "p"})),
    ]
    for op, body in attempts:
        reply = await client.call(op, body, message_id="k-1")
        assert reply["success"] is False, (op, body, reply)
        assert reply["error"]["code"] == "idempotency_conflict", reply
    # The scope's job and cached result are untouched; no key was written.
    assert await snapshot(redis_client, namespace) == before
    replay = await client.call("manage", manage(), message_id="k-1")
    assert replay == first
    dead = await drain_queue(settings, "jlm.dead")
    assert [(m.message_id, m.headers["x-jlm-error"]) for m in dead] == [
        ("k-1", "idempotency_conflict")
    ] * len(attempts)
    assert [m.body for m in dead] == [body for _, body in attempts]
    events = await read_stream(settings)
    rejected = [e for e in events if e["type"] == "request.rejected"]
    assert len(rejected) == len(attempts)
    assert [e["type"] for e in decisions_of(events, "k-1")] == ["job.enqueued"]
    assert [m.message_id for m in await drain_queue(settings, "jlm.jobs.demo")] == [job]
    m = daemon.service.metrics
    assert m.requests.labels(op="manage", outcome="rejected")._value.get() == 2
    assert m.requests.labels(op="cancel", outcome="rejected")._value.get() == 1
    assert m.requests.labels(op="invalidate", outcome="rejected")._value.get() == 1
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_keys_never_cross_actors_or_scopes_even_on_one_tag(
    auth: AuthSetup, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two tenants' scopes forced onto one hash tag; the same message_id from both."""
    monkeypatch.setattr(jlm.keys, "TAG_BITS", 0)
    assert scope_tag("tenant-a", "report.render") == scope_tag("tenant-b", "report.render")
    a, b = auth.users["a"], auth.users["b"]
    running = await start_daemon(auth.settings)
    try:
        async with client_as(auth.as_user(a)) as ca, client_as(auth.as_user(b)) as cb:
            victim = await ca.call(
                "manage",
                manage("tenant-a", job_type="report.render"),
                message_id="same",
                user_id=a.name,
            )
            assert victim["success"] is True, victim
            _, result_a = scope_keys(auth.namespace, "tenant-a", "report.render")
            secret = {"secret": "of tenant a"}
            await redis_client.hset(
                result_a,
                mapping={"job": victim["new_job_id"], "value": orjson.dumps(secret), "at": "t"},
            )
            # B, same message_id, its own scope on the same tag: its own decision, nothing of A's.
            mine = await cb.call(
                "manage",
                manage("tenant-b", job_type="report.render", policy="reuse"),
                message_id="same",
                user_id=b.name,
            )
            assert mine["success"] is True, mine
            assert mine["deduplicated"] is False
            assert mine["new_job_id"] != victim["new_job_id"]
            assert mine["previous_job_id"] is None
            assert "secret" not in orjson.dumps(mine).decode()
            # A's own key on another scope (its grant covers tenant-a-*): refused.
            other = await ca.call(
                "manage",
                manage("tenant-a-eu", job_type="report.render"),
                message_id="same",
                user_id=a.name,
            )
            assert other["error"]["code"] == "idempotency_conflict", other
            again = await ca.call(
                "manage",
                manage("tenant-a", job_type="report.render"),
                message_id="same",
                user_id=a.name,
            )
            assert again == victim
    finally:
        await running.stop()
