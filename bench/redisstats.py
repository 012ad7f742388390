"""Redis side of the bench: command counts, memory, TTL coverage, and 1M pre-populated scopes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from bench.amqp import JOB_TYPE, scope_name
from jlm.config import FileConfig
from jlm.keys import Keys, new_job_id, scope_tag
from jlm.protocol import iso, micros
from jlm.provenance import new_id
from jlm.scripts import load_lua
from jlm.store import HISTORY_BOUND


async def commandstats(client: aioredis.Redis) -> dict[str, int]:
    """Calls per command, server-wide (other users of the server add to these)."""
    info = await client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


async def used_memory(client: aioredis.Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


async def db_keys(client: aioredis.Redis, db: int) -> tuple[int, int]:
    """(keys, keys with a TTL) of one DB, from INFO keyspace: exact, no scan."""
    info = await client.info("keyspace")
    entry = info.get(f"db{db}")
    if not entry:
        return 0, 0
    return int(entry["keys"]), int(entry["expires"])


async def sample_ttls(client: aioredis.Redis, n: int) -> tuple[int, int]:
    """RANDOMKEY n times: (sampled, without a TTL)."""
    without = 0
    for _ in range(n):
        key = await client.randomkey()
        if key is None:
            return 0, 0
        if await client.ttl(key) < 0:
            without += 1
    return n, without


def manage_call(
    keys: Keys,
    file: FileConfig,
    scope: int,
    now: datetime,
    *,
    message_id: str | None = None,
    requested_at: datetime | None = None,
) -> tuple[list[str], list[Any]]:
    """The KEYS and ARGV of manage.lua for one `replace` request on bench scope `scope`, as
    `Lifecycle.manage` passes them on one Redis (with a message_id: recorded, bound here;
    without requested_at: stamped by the script)."""
    prefix = scope_name(scope)
    tag = scope_tag(prefix, JOB_TYPE)
    job_id = new_job_id(tag)
    request_id = message_id or uuid.uuid4().hex
    if message_id is None:
        record = binding = keys.no_request(tag)
    else:
        record, binding = keys.request(tag, None, message_id), keys.binding(None, message_id)
    call_keys = [
        keys.scope(tag, prefix, JOB_TYPE),
        keys.result(tag, prefix, JOB_TYPE),
        record,
        keys.job(job_id),
        keys.history(job_id),
        binding,
    ]
    args: list[Any] = [
        "replace",
        job_id,
        iso(now),
        "" if requested_at is None else micros(requested_at),
        0,
        int(message_id is not None),
        file.idempotency_ttl,
        file.job_ttl,
        keys.job_prefix(tag),
        JOB_TYPE,
        prefix,
        5,
        request_id,
        new_id(),
        keys.cancel_channel,
        HISTORY_BOUND,
        request_id,  # stands for the request's digest: one request per id here
        1,
        "",
        file.terminal_ttl,
        *file.recorded_settings(JOB_TYPE),
        "",  # no schedule: published at once
        file.max_history_jobs,
    ]
    return call_keys, args


async def prepopulate(
    url: str, namespace: str, scopes: int, *, start_at: int = 0, batch: int = 2000
) -> None:
    """One `manage` decision per scope, through the daemon's own script and key layout.

    Mirrors `Lifecycle.manage` (manage_call) for a request with a message_id, so every scope ends
    holding what a live scope holds: its scope hash, a pending job, the job's history, the
    request's idempotency record and its key's binding.
    """
    keys = Keys(namespace)
    file = FileConfig()
    client = aioredis.Redis.from_url(url)
    try:
        sha = await client.script_load(load_lua("manage"))
        for start in range(start_at, start_at + scopes, batch):
            pipe = client.pipeline(transaction=False)
            now = datetime.now(UTC)
            for scope in range(start, min(start + batch, start_at + scopes)):
                mid = uuid.uuid4().hex
                call_keys, args = manage_call(
                    keys, file, scope, now, message_id=mid, requested_at=now
                )
                pipe.evalsha(sha, len(call_keys), *call_keys, *args)
            await pipe.execute()
    finally:
        await client.aclose()
