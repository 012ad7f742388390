"""Redis at `maxmemory` with `noeviction` (a redis-server owned by the test, never the shared one).

Writes are refused (OOM) while reads still work: requests wait (not acked, not answered, not
dead-lettered), `jlm_dependency_up{dependency="redis"}` is 0 and /readyz fails for as long as it
lasts, and once memory is freed every request is decided and answered, none `internal`.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis
from tests.faults.conftest import DaemonFactory
from tests.faults.load import Publisher
from tests.support.daemon import metric
from tests.support.ledger import Accounting, drain, queue_count
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

N = 20
PAUSE = 4.0  # seconds the test keeps Redis full after the requests are sent


def fill(client: redis.Redis) -> int:
    """Write 64 KiB values until Redis refuses; return how many were written.

    Memory falls back under `maxmemory` once the refused command's buffer is freed, so the
    limit is then set 2 MiB below what is used: every write is refused until keys are deleted.
    """
    n = 0
    try:
        while True:
            client.set(f"fill:{n}", b"x" * 65536)
            n += 1
    except redis.exceptions.OutOfMemoryError:
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used - 2 * 1024 * 1024)
        return n


@pytest.mark.parametrize("policy", ["skip", "replace"])
async def test_redis_out_of_memory_pauses_writes_and_resumes(
    spawn: DaemonFactory, amqp_url: str, tmp_path: Path, policy: str
) -> None:
    server = RedisServer(
        tmp_path / "oom",
        aof=False,
        extra=("--maxmemory", "16mb", "--maxmemory-policy", "noeviction"),
    ).start()
    try:
        daemon = spawn("m", amqp_url, server.url).start()
        await daemon.wait_ready()
        # A `replace` on a new scope writes a DEL first (of the cached result), which Redis never
        # refuses: only a script refused before it runs keeps it from writing on past the limit.
        template = '{"job_type": "oom", "cache_prefix": "s%d", "payload": {}, "policy": "%s"}'

        def body(i: int) -> bytes:
            return (template % (i, policy)).encode()

        ids = [f"oom{i}" for i in range(N)]
        client = server.client()
        async with Publisher(amqp_url, "oom", declare=False) as pub:
            await pub.publish_raw("manage", body(999), correlation_id="before", message_id="b")
            assert not await pub.wait_replies({"before"}, 30)
            filled = fill(client)
            full_at = time.monotonic()
            for i, mid in enumerate(ids):
                await pub.publish_raw("manage", body(i), correlation_id=mid, message_id=mid)
            # Paused: not ready, Redis reported down, nothing answered, for as long as it lasts.
            while await daemon.ready():
                assert time.monotonic() - full_at < 15, "still ready with Redis out of memory"
                await asyncio.sleep(0.1)
            detected = round(time.monotonic() - full_at, 1)
            paused_until = time.monotonic() + PAUSE
            while time.monotonic() < paused_until:
                assert not await daemon.ready()
                text = await daemon.metrics()
                assert metric(text, "jlm_dependency_up", dependency="redis") == 0
                assert not any(m in pub.replies for m in ids)
                await asyncio.sleep(0.3)
            client.delete(*[f"fill:{n}" for n in range(filled)])
            freed_at = time.monotonic()
            missing = await pub.wait_replies(set(ids), 60)
            resumed = round(time.monotonic() - freed_at, 1)
            replies = dict(pub.replies)
        await daemon.wait_ready(30)
        text = await daemon.metrics()
        dead = await drain(amqp_url, "jlm.dead")
        logs = daemon.log_text()
        assert await daemon.terminate() == 0
        left = await queue_count(amqp_url, "jlm.requests")
        jobs = await drain(amqp_url, "jlm.jobs.oom")
    finally:
        server.stop()
    Accounting(
        f"redis out of memory (noeviction, {policy})",
        sent=N + 1,
        acked=N + 1 - left,
        replied=len(replies),
        decisions=sum(1 for m in ids if replies.get(m, [{}])[0].get("success")),
        jobs_published=len(jobs),
        lost=len(missing),
        extra={
            "seconds_to_not_ready": detected,
            "paused_seconds": PAUSE,
            "seconds_to_all_answered_after_free": resumed,
            "redis_retries": metric(text, "jlm_request_retries_total", dependency="redis"),
            "dead_lettered": len(dead),
        },
    ).report()
    assert not missing
    assert all(len(replies[m]) == 1 and replies[m][0]["success"] for m in ids)
    assert len(jobs) == N + 1
    assert dead == []
    assert left == 0
    assert metric(text, "jlm_requests_total", outcome="error") == 0
    assert metric(text, "jlm_request_retries_total", dependency="redis") > 0
    assert "internal error" not in logs
