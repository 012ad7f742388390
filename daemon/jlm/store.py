"""The Redis side: connections, and one typed call per Lua script in `lua/`."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
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

from jlm.errors import Unavailable
from jlm.keys import Keys
from jlm.metrics import Metrics

HISTORY_BOUND = 50
# Connections per Redis node. redis-py fails a call beyond its pool's limit (MaxConnectionsError)
# rather than waiting; `Store` holds its calls to this many at once.
MAX_CONNECTIONS = 64
RedisClient = aioredis.Redis | RedisCluster

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


def load_lua(name: str) -> str:
    return resources.files("jlm").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def connect(
    url: str,
    *,
    cluster: bool = False,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    verify: bool = True,
    max_connections: int = MAX_CONNECTIONS,
) -> RedisClient:
    """A client that reconnects by itself; each call fails fast while Redis is down.

    `max_connections` bounds the pool (per node on a cluster); `Store` keeps its concurrent
    calls within it, so a burst waits for a connection instead of failing.
    """
    opts: dict[str, Any] = {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 2.0,
        "health_check_interval": 15,
        "max_connections": max_connections,
    }
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


@dataclass(frozen=True, slots=True)
class Decision:
    """What a script decided: its facts, and whether they were a replay of an earlier decision."""

    replayed: bool
    facts: dict[str, Any]


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
        for name in ("manage", "cancel", "status", "invalidate", "result", "admit_job_type"):
            self.register(name)

    def register(self, name: str) -> None:
        script = self.client.register_script(load_lua(name))
        self._scripts[name] = script
        self._timers[name] = self._metrics.redis_script_duration.labels(script=name)

    async def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a script; NOSCRIPT is reloaded by the client, passing faults become Unavailable."""
        try:
            async with self._slots:
                started = time.perf_counter()
                result = await self._scripts[name](keys=list(keys), args=list(args))
        except (*_PASSING, RedisError) as exc:
            passing = _passing(exc)
            if passing is None:
                raise
            raise passing from exc
        self._timers[name].observe(time.perf_counter() - started)
        return result

    async def admit_job_type(self, job_type: str, limit: int) -> bool:
        """Whether an unconfigured job type may have a queue (at most `limit` per namespace)."""
        return bool(await self.run("admit_job_type", [self.keys.job_types], [job_type, limit]))

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

    async def decide(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Decision:
        replayed, facts = await self.run(name, keys, args)
        return Decision(bool(replayed), orjson.loads(facts))

    async def ping_script(self) -> None:
        """A script call, not a PING: readiness must fail while scripts fail.

        Until it has worked once, it also loads every registered script (on every master of a
        cluster). A script first loaded later, on NOSCRIPT, is loaded on every master too: with
        one master down, that load waits out the client's connection retries to it before the
        call is repeated. A failed preload is not a readiness failure: it is tried again."""
        await self.run("result", [self.keys.result("0000000000", "-", "-")], [])
        if not self._loaded:
            try:
                for script in self._scripts.values():
                    await self.client.script_load(script.script)
            except (*_PASSING, RedisError):
                return
            self._loaded = True

    async def close(self) -> None:
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


def pairs_to_dict(flat: list[Any]) -> dict[str, str]:
    it = iter(flat)
    return {_s(k): _s(v) for k, v in zip(it, it, strict=True)}


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
