"""Scenario 3: Redis restarted mid-load, and its scripts flushed mid-load.

Both run against a redis-server owned by the test (never the shared one). The restart case uses
AOF with `appendfsync always`: a Redis without persistence forgets every decision on restart,
which no daemon can make up for (see docs/reliability.md). The restart is a SIGKILL: a script
whose effects reached the AOF but whose answer was lost is retried, and its request record
turns the retry into a replay, not a second decision.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime

import pytest
import redis.asyncio as aioredis
from tests.faults.conftest import DaemonFactory
from tests.faults.load import Publisher, manage_request
from tests.support.daemon import metric
from tests.support.ledger import account, collect, queue_count, unequal_replies
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

JOB_TYPE = "fault-redis"
N = 1500
SCOPES = 50
DOWNTIME = 4.0


def iso_seconds(at: str) -> float:
    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


async def test_redis_killed_and_restarted_mid_load(
    spawn: DaemonFactory,
    own_redis: Callable[..., RedisServer],
    amqp_url: str,
    namespace: str,
) -> None:
    server = own_redis("aof", aof=True)
    daemon = spawn("d", amqp_url, server.url).start()
    await daemon.wait_ready()
    requests = [manage_request(f"k{i:05d}", JOB_TYPE, f"s{i % SCOPES}") for i in range(N)]
    ids = {r.message_id for r in requests}
    async with Publisher(amqp_url, "redis-restart", window=50) as pub:
        sending = asyncio.create_task(pub.send_all(requests, pace=0.05))
        while len(pub.replies) < N // 3:
            await asyncio.sleep(0.02)
        server.kill()
        killed_at, killed_wall = time.monotonic(), time.time()
        # Work pauses: readiness drops at once, and stays down while Redis is.
        while await daemon.ready():
            await asyncio.sleep(0.05)
        detected = time.monotonic() - killed_at
        while time.monotonic() - killed_at < DOWNTIME:
            assert not await daemon.ready()
            await asyncio.sleep(0.2)
        server.start()
        restarted_at, restarted_wall = time.monotonic(), time.time()
        await daemon.wait_ready(30)
        ready_again = time.monotonic() - restarted_at
        await sending
        missing = await pub.wait_replies(ids, 120)
        replies = dict(pub.replies)
    assert not missing, f"{len(missing)} unanswered"
    text = await daemon.metrics()
    retries = metric(text, "jlm_request_retries_total", dependency="redis")
    errors = metric(text, "jlm_requests_total", outcome="error")
    assert await daemon.terminate() == 0
    client = aioredis.Redis.from_url(server.url)
    try:
        evidence = await collect(amqp_url, client, namespace, [f"jlm.jobs.{JOB_TYPE}"])
    finally:
        await client.aclose()
    left = await queue_count(amqp_url, "jlm.requests")
    # What was answered while Redis was down had been decided before it went down: the daemon was
    # only finishing publishes. Nothing was answered without a committed decision.
    during = [i for i, t in pub.arrived.items() if killed_wall < t < restarted_wall]
    for i in during:
        assert iso_seconds(evidence.records[i]["at"]) < killed_wall, i
    acc = account(
        "3a redis kill -9 + restart (AOF always)",
        ids,
        replies,
        evidence,
        left,
        down_s=DOWNTIME,
        unready_after_s=round(detected, 2),
        ready_after_restart_s=round(ready_again, 2),
        redis_retries=int(retries),
        replied_while_down=len(during),
    )
    acc.report()
    assert retries > 0
    assert errors == 0
    assert acc.lost == 0
    assert acc.duplicated_decisions == 0
    assert acc.decisions == acc.sent == acc.replied == acc.acked
    assert all(r[0]["success"] for r in replies.values())
    assert not unequal_replies(replies)
    pending = [j for j, f in evidence.jobs.items() if f["state"] == "pending"]
    assert len(pending) == SCOPES


async def test_script_flush_mid_load(
    spawn: DaemonFactory,
    own_redis: Callable[..., RedisServer],
    amqp_url: str,
    namespace: str,
) -> None:
    server = own_redis("flush", aof=False)
    daemon = spawn("d", amqp_url, server.url).start()
    await daemon.wait_ready()
    requests = [manage_request(f"f{i:05d}", JOB_TYPE, f"s{i % SCOPES}") for i in range(N)]
    ids = {r.message_id for r in requests}
    flushes = 0
    admin = aioredis.Redis.from_url(server.url)
    try:
        async with Publisher(amqp_url, "script-flush", window=50) as pub:
            sending = asyncio.create_task(pub.send_all(requests, pace=0.02))
            while len(pub.replies) < N * 0.8 and not sending.done():
                await admin.script_flush()
                flushes += 1
                await asyncio.sleep(0.05)
            await sending
            missing = await pub.wait_replies(ids, 120)
            replies = dict(pub.replies)
        assert not missing
        text = await daemon.metrics()
        assert await daemon.terminate() == 0
        evidence = await collect(amqp_url, admin, namespace, [f"jlm.jobs.{JOB_TYPE}"])
    finally:
        await admin.aclose()
    left = await queue_count(amqp_url, "jlm.requests")
    acc = account(
        "3b SCRIPT FLUSH mid-load",
        ids,
        replies,
        evidence,
        left,
        flushes=flushes,
        redis_retries=int(metric(text, "jlm_request_retries_total", dependency="redis")),
    )
    acc.report()
    assert flushes >= 3
    assert metric(text, "jlm_requests_total", outcome="error") == 0
    assert acc.lost == 0
    assert acc.duplicated_decisions == 0
    assert acc.decisions == acc.sent == acc.replied == acc.acked
    assert all(r[0]["success"] for r in replies.values())
