"""The Redis side: connections, and one typed call per Lua script in `lua/`."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from jlm.errors import IdempotencyConflict, Unavailable
from jlm.facts import (
    CachedResult,
    CancelFacts,
    Decision,
    InvalidateFacts,
    JobRecord,
    ManageFacts,
)
from jlm.keys import Keys
from jlm.metrics import Metrics
from jlm.scripts import load_lua

HISTORY_BOUND = 50
MARK_DELAY = 0.02  # seconds a published-mark waits for others to share its pipeline
MARK_BATCH = 500
log = logging.getLogger(__name__)
# Connections per Redis node. redis-py fails a call beyond its pool's limit (MaxConnectionsError)
# rather than waiting; `Store` holds its calls to this many at once.
MAX_CONNECTIONS = 64
RedisClient = aioredis.Redis | RedisCluster
F = TypeVar("F")

# Errors that mean "Redis is not there right now": the request waits and is retried.
_PASSING = (RedisConnectionError, RedisTimeoutError, OSError)
# Write refusals are passing too: out of memory (OOM, `maxmemory` with `noeviction`), a failed
# snapshot (MISCONF, `stop-writes-on-bgsave-error`), too few replicas (NOREPLICAS,
# `min-replicas-to-write`). Nothing was written; the request waits until Redis accepts writes.
_PASSING_REPLIES = (
    "LOADING",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "READONLY",
    "MISCONF",
    "NOREPLICAS",
    "OOM",
)
# redis-py strips the code of the replies it maps to a class, so those are matched by class.
# NOSCRIPT: the client reloads a flushed script once; a flush racing that reload lands here.
_PASSING_REPLY_CLASSES = (
    NoScriptError,
    ReadOnlyError,
    TryAgainError,
    ClusterDownError,
    OutOfMemoryError,
)


def connect(
    url: str,
    *,
    cluster: bool = False,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    verify: bool = True,
    max_connections: int = MAX_CONNECTIONS,
    retry: bool = True,
) -> RedisClient:
    """A client that reconnects by itself; each call fails fast while Redis is down.

    `max_connections` bounds the pool (per node on a cluster); `Store` keeps its concurrent
    calls within it, so a burst waits for a connection instead of failing. `retry=False`: a
    broken connection fails the call at once, without redis-py's reconnect attempts (about 5 s
    to a dead node), for a caller that moves to another node itself.
    """
    opts: dict[str, Any] = {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 2.0,
        "health_check_interval": 15,
        "max_connections": max_connections,
    }
    if not retry:
        opts["retry"] = Retry(NoBackoff(), 0)
    if url.startswith("rediss://"):
        opts["ssl_cert_reqs"] = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
        opts["ssl_check_hostname"] = verify
        if ca_file:
            opts["ssl_ca_certs"] = ca_file
        if cert_file:
            opts["ssl_certfile"] = cert_file
        if key_file:
            opts["ssl_keyfile"] = key_file
    if cluster:
        return RedisCluster.from_url(url, **opts)
    return aioredis.Redis.from_url(url, **opts)


class Store:
    """Typed calls of the Lua scripts; every call is one round trip and one atomic step."""

    def __init__(
        self,
        client: RedisClient,
        keys: Keys,
        metrics: Metrics,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.client = client
        # One call per connection: more concurrent calls wait here, not in a failing pool.
        self._slots = asyncio.Semaphore(max_connections)
        self.keys = keys
        self._metrics = metrics
        self._scripts: dict[str, AsyncScript] = {}
        self._timers: dict[str, Any] = {}
        self._loaded = False
        self._marks: list[tuple[str, int]] = []
        self._flushing: asyncio.Task[None] | None = None
        for name in (
            "manage",
            "cancel",
            "status",
            "invalidate",
            "result",
            "bind",
            "admit_job_type",
        ):
            self.register(name)

    def register(self, name: str) -> None:
        script = self.client.register_script(load_lua(name))
        self._scripts[name] = script
        self._timers[name] = self._metrics.redis_script_duration.labels(script=name)

    async def run(
        self, name: str, keys: Sequence[str], args: Sequence[Any], *, timed: bool = True
    ) -> Any:
        """Run a script; NOSCRIPT is reloaded by the client, passing faults become Unavailable.
        `timed=False` keeps the call out of jlm_redis_script_duration_seconds (a probe)."""
        try:
            async with self._slots:
                started = time.perf_counter()
                result = await self._scripts[name](keys=list(keys), args=list(args))
        except (*_PASSING, RedisError) as exc:
            passing = _passing(exc)
            if passing is None:
                raise
            raise passing from exc
        if timed:
            self._timers[name].observe(time.perf_counter() - started)
        return result

    async def ping_write(self) -> None:
        """A write Redis may refuse while it stays reachable (out of memory, MISCONF, ...).

        Readiness uses it after a refused write: a read-only script call would pass meanwhile.
        """
        try:
            async with self._slots:
                await self.client.set(f"{self.keys.namespace}:write-probe", b"1", px=10_000)
        except (*_PASSING, RedisError) as exc:
            passing = _passing(exc)
            if passing is None:
                raise
            raise passing from exc

    async def decide(
        self, name: str, keys: Sequence[str], args: Sequence[Any]
    ) -> Decision[dict[str, Any]]:
        """Run a recording script; IdempotencyConflict when its key is bound to another request."""
        status, facts, *rest = await self.run(name, keys, args)
        if status == 2:
            raise IdempotencyConflict(
                "this message_id was used for another request (operation, scope or body); "
                "use a new message_id for a new request"
            )
        result, state, republish = (*rest, None, None, None)[:3]
        return Decision(
            replayed=status == 1,
            facts=orjson.loads(facts),
            result=result,
            job_state=state.decode() if state else None,
            republish=bool(republish),
        )

    # -- one typed call per script: keyword arguments in the script header's KEYS, ARGV order --

    async def manage(
        self,
        *,
        scope: str,
        result: str,
        record: str,
        job: str,
        history: str,
        binding: str,
        policy: str,
        job_id: str,
        now: str,
        requested_at: int | str,
        cancel_running: bool,
        record_request: bool,
        idempotency_ttl: int,
        job_ttl: int,
        job_prefix: str,
        job_type: str,
        cache_prefix: str,
        priority: int,
        request_id: str,
        provenance_id: str,
        cancel_channel: str,
        history_bound: int,
        digest: str,
        bind_here: bool,
        session: str,
        terminal_ttl: int,
        type_settings: tuple[int, int, float, str],
        schedule: str = "",
        max_history_jobs: int,
    ) -> Decision[ManageFacts]:
        """manage.lua: one decision for one dedup scope (with the job type's settings)."""
        d = await self.decide(
            "manage",
            [scope, result, record, job, history, binding],
            [
                policy,
                job_id,
                now,
                requested_at,
                int(cancel_running),
                int(record_request),
                idempotency_ttl,
                job_ttl,
                job_prefix,
                job_type,
                cache_prefix,
                priority,
                request_id,
                provenance_id,
                cancel_channel,
                history_bound,
                digest,
                int(bind_here),
                session,
                terminal_ttl,
                *type_settings,
                schedule,
                max_history_jobs,
            ],
        )
        return _typed(d, ManageFacts.decode(d.facts))

    async def cancel(
        self,
        *,
        job: str,
        history: str,
        record: str,
        binding: str,
        running: bool,
        now: str,
        record_request: bool,
        idempotency_ttl: int,
        provenance_id: str,
        cancel_channel: str,
        job_id: str,
        history_bound: int,
        job_ttl: int,
        digest: str,
        bind_here: bool,
        session: str,
        terminal_ttl: int,
        max_history_jobs: int,
    ) -> Decision[CancelFacts]:
        """cancel.lua: cancel one job by id."""
        d = await self.decide(
            "cancel",
            [job, history, record, binding],
            [
                int(running),
                now,
                int(record_request),
                idempotency_ttl,
                provenance_id,
                cancel_channel,
                job_id,
                history_bound,
                job_ttl,
                digest,
                int(bind_here),
                session,
                terminal_ttl,
                max_history_jobs,
            ],
        )
        return _typed(d, CancelFacts.decode(d.facts))

    async def invalidate(
        self,
        *,
        result: str,
        record: str,
        binding: str,
        record_request: bool,
        idempotency_ttl: int,
        provenance_id: str,
        now: str,
        digest: str,
        bind_here: bool,
        session: str,
    ) -> Decision[InvalidateFacts]:
        """invalidate.lua: drop a scope's cached result."""
        d = await self.decide(
            "invalidate",
            [result, record, binding],
            [
                int(record_request),
                idempotency_ttl,
                provenance_id,
                now,
                digest,
                int(bind_here),
                session,
            ],
        )
        return _typed(d, InvalidateFacts.decode(d.facts))

    async def status(self, *, job: str, history: str) -> JobRecord:
        """status.lua: one consistent read of a job and its history."""
        fields, entries = await self.run("status", [job, history], [])
        return JobRecord(pairs_to_dict(fields), entries)

    async def result(self, *, result: str) -> CachedResult:
        """result.lua: a scope's cached result."""
        job_id, value, at = await self.run("result", [result], [])
        if job_id is None:
            return CachedResult(None, None, None)
        return CachedResult(job_id.decode(), value, None if at is None else at.decode())

    async def admit_job_type(self, *, job_types: str, job_type: str, limit: int) -> bool:
        """admit_job_type.lua: whether an unconfigured job type may have a queue (at most
        `limit` per namespace)."""
        return bool(await self.run("admit_job_type", [job_types], [job_type, limit]))

    async def bind(self, *, binding: str, digest: str, ttl: int) -> None:
        """bind.lua: bind an idempotency key in its own slot (Redis Cluster); IdempotencyConflict
        if taken."""
        if not await self.run("bind", [binding], [digest, ttl]):
            raise IdempotencyConflict(
                "this message_id was used for another request (operation, scope or body); "
                "use a new message_id for a new request"
            )

    def mark_published(self, record: str, ttl: int) -> None:
        """Note on a request record, soon, that the broker confirmed its decision's messages.

        Marks are written in batches, one pipeline of plain commands per batch: the request's one
        round trip stays its decision. A mark lost (Redis down, a crash before the batch) only
        lets a later redelivery publish the decision again, which a never-acked delivery may."""
        self._marks.append((record, ttl))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(MARK_DELAY)
        await self.flush_marks()

    async def flush_marks(self) -> None:
        """Write the pending marks now (`ok` on each record; a record that had expired meanwhile
        gets its TTL back, never lives on without one)."""
        while self._marks:
            batch, self._marks = self._marks[:MARK_BATCH], self._marks[MARK_BATCH:]
            pipe = self.client.pipeline(transaction=False)
            for record, ttl in batch:
                pipe.hset(record, "ok", 1)
                pipe.expire(record, ttl, nx=True)
            try:
                async with self._slots:
                    await pipe.execute()
            except (*_PASSING, RedisError) as exc:
                log.info("dropped %d published-marks of request records: %s", len(batch), exc)

    async def ping_script(self) -> None:
        """A script call, not a PING: readiness must fail while scripts fail.

        Until it has worked once, it also loads every registered script (on every master of a
        cluster). A script first loaded later, on NOSCRIPT, is loaded on every master too: with
        one master down, that load waits out the client's connection retries to it before the
        call is repeated. A failed preload is not a readiness failure: it is tried again."""
        # Not request traffic: the probe stays out of the script timings.
        await self.run("result", [self.keys.result("0000000000", "-", "-")], [], timed=False)
        if not self._loaded:
            try:
                for script in self._scripts.values():
                    await self.client.script_load(script.script)
            except (*_PASSING, RedisError):
                return
            self._loaded = True

    async def close(self) -> None:
        await self.flush_marks()
        await self.client.aclose()


def _passing(exc: BaseException) -> Unavailable | None:
    """Unavailable for a passing Redis fault; None for any other reply error (a defect)."""
    if isinstance(exc, (*_PASSING, *_PASSING_REPLY_CLASSES)):
        return Unavailable(f"redis: {type(exc).__name__}: {exc}", "redis")
    if isinstance(exc, ResponseError):
        if str(exc).startswith(_PASSING_REPLIES):
            return Unavailable(f"redis: {exc}", "redis")
        return None
    return Unavailable(f"redis: {type(exc).__name__}: {exc}", "redis")


def _typed(d: Decision[Any], facts: F) -> Decision[F]:
    return Decision(d.replayed, facts, d.result, d.job_state, d.republish)


def pairs_to_dict(flat: list[Any]) -> dict[str, str]:
    it = iter(flat)
    return {_s(k): _s(v) for k, v in zip(it, it, strict=True)}


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
