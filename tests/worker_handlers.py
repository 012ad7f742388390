"""Handlers that `jlm worker tests.worker_handlers:NAME` runs in the worker tests.

Each records what it did in Redis under `<namespace>:test:*` (the worker's own JLM_REDIS_URL,
JLM_REDIS_CLUSTER and JLM_REDIS_NAMESPACE), so a test can count executions across processes.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from jlm.worker import Job

_client: aioredis.Redis | RedisCluster | None = None


def _redis() -> aioredis.Redis | RedisCluster:
    """A client of the worker's own Redis: a cluster client when JLM_REDIS_CLUSTER is true."""
    global _client
    if _client is None:
        url = os.environ["JLM_REDIS_URL"]
        if os.environ.get("JLM_REDIS_CLUSTER", "").lower() in ("1", "true", "yes", "on"):
            _client = RedisCluster.from_url(url)
        else:
            _client = aioredis.Redis.from_url(url)
    return _client


def key(name: str, namespace: str | None = None) -> str:
    return f"{namespace or os.environ['JLM_REDIS_NAMESPACE']}:test:{name}"


async def count(job: Job) -> dict[str, Any]:
    """Count one execution of the job (exactly-once checks)."""
    await _redis().hincrby(key("runs"), job.id, 1)
    return {"job": job.id, "echo": job.payload}


async def ordered(job: Job) -> int:
    """Record the priority of each job in execution order."""
    await _redis().rpush(key("order"), job.priority)
    return job.priority


async def sleepy(job: Job) -> dict[str, Any]:
    """Sleep `seconds` (only on attempt 1 when `first_only`), then write a `done` marker.

    A cancelled run never writes the marker: CancelledError leaves the sleep.
    """
    r = _redis()
    await r.hincrby(key("runs"), job.id, 1)
    await r.set(key(f"started:{job.id}"), job.attempt)
    seconds = float(job.payload.get("seconds", 1))
    if job.payload.get("first_only") and job.attempt > 1:
        seconds = 0
    await asyncio.sleep(seconds)
    await r.set(key(f"done:{job.id}"), job.attempt)
    return {"v": job.payload.get("v"), "attempt": job.attempt}


async def nap(job: Job) -> dict[str, Any]:
    """Sleep `seconds` and touch nothing (for tests where part of Redis is down)."""
    await asyncio.sleep(float(job.payload.get("seconds", 1)))
    return {"slept": job.payload.get("seconds", 1)}


async def stubborn(job: Job) -> str:
    """Ignore cancellation for `seconds`, then write a `done` marker."""
    r = _redis()
    await r.set(key(f"started:{job.id}"), 1)
    loop = asyncio.get_running_loop()
    end = loop.time() + float(job.payload.get("seconds", 4))
    while (left := end - loop.time()) > 0:
        try:
            await asyncio.sleep(left)
        except asyncio.CancelledError:
            await r.incr(key(f"ignored:{job.id}"))
    await r.set(key(f"done:{job.id}"), 1)
    return "finished anyway"


async def failing(job: Job) -> None:
    """Always fail, counting each attempt."""
    await _redis().hincrby(key("runs"), job.id, 1)
    raise RuntimeError(f"boom on attempt {job.attempt}")


async def traced(job: Job) -> dict[str, Any]:
    """What a handler sees of its job's trace: the job's own attributes and the current context."""
    from jlm import tracing

    ctx = tracing.current()
    return {
        "trace_id": job.trace_id,
        "traceparent": job.traceparent,
        "current": ctx.trace_id if ctx is not None else None,
    }


async def flaky(job: Job) -> dict[str, Any]:
    """Fail until attempt `succeed_on` (payload), counting each attempt; then succeed."""
    await _redis().hincrby(key("runs"), job.id, 1)
    if job.attempt < int(job.payload["succeed_on"]):
        raise RuntimeError(f"boom on attempt {job.attempt}")
    return {"attempt": job.attempt}


async def progressing(job: Job) -> dict[str, Any]:
    """Report progress `steps` times, `every` seconds apart, recording what each call returned;
    with `hold`, then wait for the test's `go:<job>` key and report once more."""
    r = _redis()
    steps, every = int(job.payload.get("steps", 1)), float(job.payload.get("every", 0))
    for i in range(1, steps + 1):
        ok = await job.progress(i / steps / 2, f"step {i} of {steps}")
        await r.rpush(key(f"progress:{job.id}"), int(ok))
        await asyncio.sleep(every)
    if job.payload.get("hold"):
        while not await r.exists(key(f"go:{job.id}")):
            await asyncio.sleep(0.02)
        ok = await job.progress(1.0, "after go")
        await r.rpush(key(f"progress:{job.id}"), int(ok))
    return {"steps": steps}
