"""The daemon end to end against the real Redis and RabbitMQ: every operation and policy."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import redis.asyncio as aioredis
from tests.amqp_helpers import drain_queue, read_stream
from tests.support.services import RunningDaemon, start_daemon

from jlm.client import Client
from jlm.config import Settings
from jlm.keys import Keys, scope_tag


def manage(job_type: str = "demo", **fields: Any) -> dict[str, Any]:
    return {"job_type": job_type, "payload": {"x": 1}} | fields


async def test_manage_supersedes_a_pending_job(
    daemon: RunningDaemon, client: Client, settings: Settings
) -> None:
    first = await client.call("manage", manage())
    assert first["success"] is True
    assert first["previous_job_id"] is None
    assert first["stale_cancelled"] is False
    assert first["state"] == "pending"
    second = await client.call("manage", manage())
    assert second["stale_cancelled"] is True
    assert second["cache_invalidated"] is True
    assert second["previous_job_id"] == first["new_job_id"]
    assert second["deduplicated"] is False
    old = await client.call("status", {"job_id": first["new_job_id"]})
    assert old["state"] == "cancelled"
    assert old["superseded_by"] == second["new_job_id"]
    assert [h["state"] for h in old["history"]] == ["pending", "cancelled"]
    jobs = await drain_queue(settings, "jlm.jobs.demo")
    assert [m.message_id for m in jobs] == [first["new_job_id"], second["new_job_id"]]
    body = orjson.loads(jobs[1].body)
    assert body["job_id"] == second["new_job_id"]
    assert body["payload"] == {"x": 1}
    assert body["cache_prefix"] == "job"
    assert body["enqueued_at"].endswith("Z")
    assert jobs[1].priority == 5
    assert jobs[1].delivery_mode == 2
    assert jobs[1].content_type == "application/json"


async def test_events_name_each_decision(
    daemon: RunningDaemon, client: Client, settings: Settings
) -> None:
    first = await client.call("manage", manage(cache_prefix="t1"), message_id="req-1")
    second = await client.call("manage", manage(cache_prefix="t1"), message_id="req-2")
    events = await read_stream(settings)
    by_id = {e["provenance_id"]: e for e in events}
    assert by_id[first["provenance_id"]]["type"] == "job.enqueued"
    main = by_id[second["provenance_id"]]
    assert main["type"] == "job.enqueued"
    assert main["status"] == "pending"
    assert main["request_id"] == "req-2"
    assert main["job_id"] == second["new_job_id"]
    assert main["agent"]["id"] == "job-lifecycle-manager"
    assert main["scope"] == {"cache_prefix": "t1", "job_type": "demo"}
    assert main["metadata"]["output"]["new_job_id"] == second["new_job_id"]
    superseded = [e for e in events if e["type"] == "job.superseded"]
    assert len(superseded) == 1
    assert superseded[0]["job_id"] == first["new_job_id"]
    assert superseded[0]["status"] == "cancelled"


async def test_skip_policy_answers_with_the_live_job(daemon: RunningDaemon, client: Client) -> None:
    first = await client.call("manage", manage(policy="skip"))
    again = await client.call("manage", manage(policy="skip"))
    assert again["deduplicated"] is True
    assert again["new_job_id"] == first["new_job_id"]
    assert again["stale_cancelled"] is False
    await client.call("cancel", {"job_id": first["new_job_id"]})
    third = await client.call("manage", manage(policy="skip"))
    assert third["deduplicated"] is False
    assert third["previous_job_id"] == first["new_job_id"]


async def test_reuse_policy_answers_with_the_cached_result(
    daemon: RunningDaemon,
    client: Client,
    redis_client: aioredis.Redis,
    namespace: str,
) -> None:
    first = await client.call("manage", manage(policy="reuse", cache_prefix="r"))
    again = await client.call("manage", manage(policy="reuse", cache_prefix="r"))
    assert again["deduplicated"] is True
    assert "result" not in again
    # A worker's success writes the scope's result (see the worker SDK); write it as one does.
    tag = scope_tag("r", "demo")
    keys = Keys(namespace)
    await redis_client.hset(
        keys.result(tag, "r", "demo"),
        mapping={
            "job": first["new_job_id"],
            "value": orjson.dumps({"pages": 3}),
            "at": "t",
        },
    )
    await redis_client.hset(keys.job(first["new_job_id"]), "state", "succeeded")
    hit = await client.call("manage", manage(policy="reuse", cache_prefix="r"))
    assert hit["deduplicated"] is True
    assert hit["result"] == {"pages": 3}
    assert hit["new_job_id"] == first["new_job_id"]
    result = await client.call("result", {"job_type": "demo", "cache_prefix": "r"})
    assert result == {
        "success": True,
        "cached": True,
        "job_id": first["new_job_id"],
        "result": {"pages": 3},
        "cached_at": "t",
    }
    replaced = await client.call("manage", manage(cache_prefix="r"))
    assert replaced["cache_invalidated"] is True
    after = await client.call("result", {"job_type": "demo", "cache_prefix": "r"})
    assert after["cached"] is False


async def test_invalidate_and_result(
    daemon: RunningDaemon, client: Client, redis_client: aioredis.Redis, namespace: str
) -> None:
    never = await client.call("result", {"job_type": "never-used", "cache_prefix": "p"})
    assert never == {"success": True, "cached": False, "job_id": None, "result": None}
    nothing = await client.call("invalidate", {"job_type": "demo", "cache_prefix": "p"})
    assert nothing["cache_invalidated"] is False
    assert nothing["provenance_id"]
    keys = Keys(namespace)
    await redis_client.hset(
        keys.result(scope_tag("p", "demo"), "p", "demo"), mapping={"job": "j", "value": b"1"}
    )
    dropped = await client.call("invalidate", {"job_type": "demo", "cache_prefix": "p"})
    assert dropped["cache_invalidated"] is True


async def test_cancel_and_status(daemon: RunningDaemon, client: Client) -> None:
    job = (await client.call("manage", manage()))["new_job_id"]
    cancelled = await client.call("cancel", {"job_id": job})
    assert cancelled["success"] is True
    assert cancelled["cancelled"] is True
    assert cancelled["state"] == "cancelled"
    again = await client.call("cancel", {"job_id": job})
    assert again["cancelled"] is False
    status = await client.call("status", {"job_id": job})
    for field in ("job_type", "cache_prefix", "priority", "created_at", "updated_at", "history"):
        assert field in status
    assert status["state"] == "cancelled"
    assert status["superseded_by"] is None
    missing = await client.call("cancel", {"job_id": "0000000000-" + "0" * 32})
    assert missing["success"] is False
    assert missing["error"]["code"] == "not_found"
    foreign = await client.call("status", {"job_id": "not-a-job"})
    assert foreign["error"]["code"] == "not_found"


async def test_same_message_id_makes_one_decision(
    daemon: RunningDaemon, client: Client, settings: Settings
) -> None:
    first = await client.call("manage", manage(), message_id="once")
    again = await client.call("manage", manage(), message_id="once")
    assert again == first
    jobs = await drain_queue(settings, "jlm.jobs.demo")
    # The replay of an acked request publishes nothing: one job message.
    assert [m.message_id for m in jobs] == [first["new_job_id"]]
    status = await client.call("status", {"job_id": first["new_job_id"]})
    assert status["state"] == "pending"


async def test_older_request_never_supersedes(daemon: RunningDaemon, client: Client) -> None:
    new = await client.call("manage", manage(requested_at="2026-11-28T12:00:01.000Z"))
    old = await client.call("manage", manage(requested_at="2026-11-28T12:00:00.000Z"))
    assert old["success"] is True
    assert old["deduplicated"] is True
    assert old["new_job_id"] == new["new_job_id"]
    status = await client.call("status", {"job_id": new["new_job_id"]})
    assert status["state"] == "pending"


async def test_priority_is_carried_to_the_job_queue(
    daemon: RunningDaemon, client: Client, settings: Settings
) -> None:
    for prefix, prio in (("a", 1), ("b", 10), ("c", 7)):
        await client.call("manage", manage("prio", cache_prefix=prefix, priority=prio))
    jobs = await drain_queue(settings, "jlm.jobs.prio")
    assert [m.priority for m in jobs] == [10, 7, 1]


async def test_5000_requests_over_500_scopes(
    daemon: RunningDaemon, settings: Settings, client: Client
) -> None:
    futures = []
    for i in range(5000):
        fut = await client.send(
            "manage", manage("load", cache_prefix=f"s{i % 500}"), message_id=f"m{i}"
        )
        futures.append(fut)
    replies = await asyncio.wait_for(asyncio.gather(*futures), 120)
    assert len(replies) == 5000
    assert all(r["success"] for r in replies)
    live: dict[str, list[str]] = {}
    for i, r in enumerate(replies):
        live.setdefault(f"s{i % 500}", []).append(r["new_job_id"])
    # The last request of each scope holds the one live job; every earlier one was cancelled.
    for scope, jobs in live.items():
        states = [(await client.call("status", {"job_id": j}))["state"] for j in jobs[-2:]]
        assert states == ["cancelled", "pending"], scope
    pending = await count_states(daemon, "pending")
    assert pending == 500


async def test_burst_beyond_redis_connections_waits_not_fails(settings: Settings) -> None:
    """More decisions in flight than Redis connections: they queue for one, none is retried."""
    small = settings.model_copy(update={"redis_max_connections": 4, "prefetch": 256})
    running = await start_daemon(small)
    try:
        async with Client(small) as c:
            futures = [
                await c.send("manage", manage("burst", cache_prefix=f"b{i % 400}"))
                for i in range(1200)
            ]
            replies = await asyncio.wait_for(asyncio.gather(*futures), 120)
        assert all(r["success"] for r in replies)
        registry = running.service.metrics.registry
        retried = registry.get_sample_value("jlm_request_retries_total", {"dependency": "redis"})
        assert not retried, f"{retried} decisions waited for Redis as if it were down"
        assert running.service.health.checks["redis"] is True
    finally:
        await running.stop()


async def count_states(daemon: RunningDaemon, state: str) -> int:
    store = daemon.service.store
    n = 0
    jobs = f"{store.keys.namespace}:{{*}}:job:*"
    async for key in store.client.scan_iter(match=jobs, count=5000):
        if key.endswith(b":h"):
            continue
        if (await store.client.hget(key, "state")) == state.encode():
            n += 1
    return n


async def test_requests_in_order_leave_the_last_live(daemon: RunningDaemon, client: Client) -> None:
    futures = [
        await client.send("manage", manage("order", cache_prefix=f"o{i % 10}", payload={"i": i}))
        for i in range(200)
    ]
    replies = await asyncio.gather(*futures)
    for scope in range(10):
        mine = [r for i, r in enumerate(replies) if i % 10 == scope]
        chain = [r["previous_job_id"] for r in mine[1:]]
        assert chain == [r["new_job_id"] for r in mine[:-1]], "applied out of delivery order"
        last = await client.call("status", {"job_id": mine[-1]["new_job_id"]})
        assert last["state"] == "pending"


async def test_reply_echoes_correlation_id(daemon: RunningDaemon, settings: Settings) -> None:
    async with Client(settings) as c:
        reply = await c.call("manage", manage(), message_id=str(uuid.uuid4()))
        assert reply["success"]


async def test_metrics_and_health_endpoints(daemon: RunningDaemon, client: Client) -> None:
    await client.call("manage", manage())
    status, body = await http_get(daemon.metrics_url + "/readyz")
    assert status == 200
    status, body = await http_get(daemon.metrics_url + "/healthz")
    assert status == 200
    status, body = await http_get(daemon.metrics_url + "/metrics")
    assert status == 200
    text = body.decode()
    for name in (
        "jlm_requests_total",
        "jlm_jobs_enqueued_total",
        "jlm_request_duration_seconds",
        "jlm_inflight_requests",
        "jlm_dependency_up",
        "jlm_build_info",
    ):
        assert name in text
    assert 'jlm_requests_total{op="manage",outcome="ok"} 1.0' in text


async def http_get(url: str) -> tuple[int, bytes]:
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /{path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body
