"""Scheduled jobs on the Redis side: a `manage` decision's schedule argument, and the due sets.

A job held back (policy `debounce`, or `not_before`) is `scheduled` in its job hash, written by
`manage.lua` in its scope's slot. Its entry in a due set (`keys.due`, one of DUE_SLOTS sorted sets
under hash tags of their own) is added right after the decision, before the request is acked: a
crash in between leaves the request to be redelivered, and its replay adds the entry again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio.cluster import RedisCluster

from jlm.config import JobTypeConfig
from jlm.errors import InvalidRequest
from jlm.keys import DUE_SLOTS, due_slot
from jlm.protocol import JobMessage, ManageRequest, iso, micros, parse_time
from jlm.store import HISTORY_BOUND, Store

SCRIPTS = ("add_due", "take_due", "settle_due", "promote")


def schedule_arg(req: ManageRequest, jt: JobTypeConfig, policy: str) -> str:
    """manage.lua's schedule argument (lua/schedule.lua): '' for a job published at once."""
    s: dict[str, Any] = {}
    if policy == "debounce":
        window = req.debounce_ms or jt.debounce_ms
        if window is None:
            raise InvalidRequest(
                "policy debounce needs debounce_ms, in the request or in the job type's "
                "configuration"
            )
        s["db"] = window
        bound = req.max_wait_ms or jt.max_wait_ms
        if bound is not None:
            s["mw"] = bound
    elif req.debounce_ms is not None or req.max_wait_ms is not None:
        raise InvalidRequest("debounce_ms and max_wait_ms go with policy debounce")
    if req.not_before is not None:
        s["nb"] = micros(parse_time(req.not_before, "not_before")) // 1000
    if not s:
        return ""
    s["p"] = orjson.dumps(req.payload).decode()
    return orjson.dumps(s).decode()


def ms_iso(ms: int) -> str:
    """A time in ms since the epoch as RFC 3339 UTC."""
    return iso(datetime.fromtimestamp(ms / 1000, UTC))


@dataclass(frozen=True, slots=True)
class Promotion:
    """promote.lua: what to do with a taken entry (publish | later | drop)."""

    verdict: str
    due_ms: int
    server_ms: int  # the Redis server's time of the promotion
    job: JobMessage | None = None


class DueSets:
    """Typed calls of the due-set scripts (header of each in lua/)."""

    def __init__(self, store: Store, job_ttl: int) -> None:
        self._store = store
        self._keys = store.keys
        self._job_ttl = job_ttl
        for name in SCRIPTS:
            store.register(name)

    async def add(self, job_id: str, due_ms: int) -> None:
        """add_due.lua: the job's entry in its due set."""
        due = self._keys.due(due_slot(job_id))
        await self._store.run("add_due", [due], [job_id, due_ms])

    @property
    def one_call(self) -> bool:
        """Whether every due set can be taken from in one call (`take_all`): one Redis, where a
        script may touch keys of any slot."""
        return not isinstance(self._store.client, RedisCluster)

    async def take(self, slot: int, limit: int, lease_ms: int) -> list[str]:
        """take_due.lua: up to `limit` due job ids of one due set, leased to this caller."""
        [ids] = await self._take([slot], limit, lease_ms)
        return ids

    async def take_all(self, limit: int, lease_ms: int) -> list[list[str]]:
        """take_due.lua over every due set in one call (one Redis only: `one_call`): up to
        `limit` due job ids of each, by slot."""
        return await self._take(range(DUE_SLOTS), limit, lease_ms)

    async def _take(self, slots: Iterable[int], limit: int, lease_ms: int) -> list[list[str]]:
        k = self._keys
        keys = [key for slot in slots for key in (k.due(slot), k.due_taken(slot))]
        taken = await self._store.run("take_due", keys, [limit, lease_ms])
        return [[i.decode() for i in ids] for ids in taken]

    async def promote(self, job_id: str, lease_ms: int) -> Promotion:
        """promote.lua: a taken job becomes pending if due (its job message is built here)."""
        k = self._keys
        r = await self._store.run(
            "promote",
            [k.job(job_id), k.history(job_id)],
            [iso(datetime.now(UTC)), HISTORY_BOUND, self._job_ttl, lease_ms],
        )
        verdict, due, server = r[0].decode(), int(r[1]), int(r[2])
        if verdict != "publish":
            return Promotion(verdict, due, server)
        job_type, cache_prefix, payload, priority, at = (v.decode() for v in r[3:8])
        job = JobMessage(job_id, job_type, cache_prefix, orjson.loads(payload), int(priority), at)
        return Promotion(verdict, due, server, job)

    async def settle(self, slot: int, entries: list[tuple[str, int | None]]) -> None:
        """settle_due.lua: entries done with (None), or put back with their due time."""
        if not entries:
            return
        k = self._keys
        args: list[Any] = []
        for job_id, due in entries:
            args += [job_id, "" if due is None else due]
        await self._store.run("settle_due", [k.due(slot), k.due_taken(slot)], args)


def status_reply(job_id: str, job: dict[str, str], history: list[Any]) -> dict[str, Any]:
    """The `status` reply from a job's hash and history (status.lua's answer)."""
    reply: dict[str, Any] = {
        "success": True,
        "job_id": job_id,
        "state": job.get("state"),
        "job_type": job.get("job_type"),
        "cache_prefix": job.get("cache_prefix"),
        "priority": int(job.get("priority", "5")),
        "created_at": job.get("created_at"),
        "updated_at": job.get("updated_at"),
        "superseded_by": job.get("superseded_by"),
        "attempt": int(job.get("attempt", "0")),
        "history": [orjson.loads(h) for h in history],
    }
    if job.get("error"):
        reply["error"] = job["error"]
    if job.get("progress"):  # {fraction, message, at}: the latest a handler reported
        reply["progress"] = orjson.loads(job["progress"])
    if job.get("due"):
        reply["due_at"] = ms_iso(int(job["due"]))  # when a scheduled job is (was) published
    return reply
