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


async def flaky(job: Job) -> dict[str, Any]:
    """Fail until attempt `succeed_on` (payload), counting each attempt; then succeed."""
    await _redis().hincrby(key("runs"), job.id, 1)
    if job.attempt < int(job.payload["succeed_on"]):
        raise RuntimeError(f"boom on attempt {job.attempt}")
    return {"attempt": job.attempt}
