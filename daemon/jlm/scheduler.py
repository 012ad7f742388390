"""The scheduler inside each daemon: scheduled jobs are published once due, each by one daemon.

Every daemon sweeps every due set (`keys.due`) a few times a second. `take_due.lua` moves the due
entries of the sets (all of them in one call on one Redis) to their taken sets under a lease,
atomically, so two daemons never take the same entry while its lease runs. For each entry taken,
`promote.lua` makes the job pending in its own slot (if it is still scheduled and due), the job
message and its `job.enqueued` event are published with confirms, and `settle_due.lua` drops the
entry. A daemon killed anywhere in between leaves the entry taken: once its lease expires another
daemon takes it, and publishes it again if it might not have left (a worker claims a job once, so
a second message is harmless).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import anyio

from jlm.broker import Broker
from jlm.config import Settings
from jlm.due import DueSets, Promotion, ms_iso
from jlm.errors import Unavailable
from jlm.keys import DUE_SLOTS
from jlm.metrics import Metrics
from jlm.provenance import Event, scope_of
from jlm.retry import RECONNECT_START, Backoff, RareLog

log = logging.getLogger(__name__)
TICK = 0.2  # seconds between sweeps while nothing is due: at most this late, plus a publish
LEASE_MS = 10_000  # a taken entry not settled within this is taken again by another daemon
# Entries taken per due set and sweep (16 sets: 800 a sweep at most), few enough to be published
# well within a lease; a full batch makes the next sweep start at once.
BATCH = 50
CONCURRENCY = 64  # promote calls at once
_EVENT_IDS = uuid.UUID("6a1f1c1e-6f0e-4a43-9f43-2c3b5d0e8f11")


def enqueued_event(p: Promotion) -> Event:
    """The `job.enqueued` event of a scheduled job, published with its job message; its id is
    derived from the job's, so a publish repeated after a crash repeats the same event."""
    job = p.job
    assert job is not None
    return Event(
        str(uuid.uuid5(_EVENT_IDS, job.job_id)),
        "job.enqueued",
        "pending",
        job.enqueued_at or ms_iso(p.server_ms),
        None,
        None,
        job.job_id,
        scope_of(job.cache_prefix, job.job_type),
        {"scheduled": True, "due_at": ms_iso(p.due_ms)},
        {"new_job_id": job.job_id, "state": "pending", "priority": job.priority},
    )


class Scheduler:
    """Sweeps the due sets while the daemon has a broker session."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        due: DueSets,
        broker_of: Callable[[], Broker | None],
        *,
        rare: RareLog,
        stopping: asyncio.Event,
    ) -> None:
        self._file = settings.file
        self._retry_max = settings.retry_max_delay
        self._m = metrics
        self._due = due
        self._broker_of = broker_of
        self._rare = rare
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._stopping = stopping

    async def run(self) -> None:
        """Sweep until the daemon stops (a sweep under way ends first); a fault waits with a
        backoff (entries it had taken keep their lease)."""
        backoff = Backoff(RECONNECT_START, self._retry_max)
        while not self._stopping.is_set():
            broker = self._broker_of()
            if broker is None or broker.closed.is_set():
                await anyio.sleep(TICK)
                continue
            try:
                more = await self.sweep(broker)
            except Unavailable as exc:
                self._rare.warn_rarely("scheduler", "scheduler waiting: %s", exc.message)
                await anyio.sleep(backoff.next())
                continue
            except Exception:  # a defect (or a refused command) pauses the sweeps, never the daemon
                log.exception("scheduler sweep failed; trying again")
                await anyio.sleep(backoff.next())
                continue
            backoff.reset()
            if not more:
                await anyio.sleep(TICK)

    async def sweep(self, broker: Broker) -> bool:
        """One pass over every due set, the sets at once; True if a set had a full batch due.

        On one Redis the sets are taken from in one call (an idle pass is one round trip); on a
        Redis Cluster one call per set, so that a set whose node is down holds back no other."""
        full = False
        work: list[Awaitable[object]]
        if self._due.one_call:
            taken = await self._due.take_all(BATCH, LEASE_MS)
            full = any(len(ids) == BATCH for ids in taken)
            work = [self._publish(broker, slot, ids) for slot, ids in enumerate(taken) if ids]
        else:
            work = [self._sweep_set(broker, slot) for slot in range(DUE_SLOTS)]
        results = await asyncio.gather(*work, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return full or any(r is True for r in results)

    async def _sweep_set(self, broker: Broker, slot: int) -> bool:
        ids = await self._due.take(slot, BATCH, LEASE_MS)
        if ids:
            await self._publish(broker, slot, ids)
        return len(ids) == BATCH

    async def _publish(self, broker: Broker, slot: int, ids: list[str]) -> None:
        """Promote a batch, publish what is due at once, settle; what failed stays taken until
        its lease expires."""
        promoted = await asyncio.gather(*(self._promote(i) for i in ids), return_exceptions=True)
        settled: list[tuple[str, int | None]] = []
        ready: dict[str, tuple[Promotion, Event]] = {}
        for job_id, p in zip(ids, promoted, strict=True):
            if isinstance(p, Unavailable):
                self._rare.warn_rarely("scheduler-job", "scheduled job waits: %s", p.message)
            elif isinstance(p, BaseException):
                log.error("scheduled job %s not published: %r", job_id, p, exc_info=p)
            elif p.verdict == "publish" and p.job is not None:
                ready[job_id] = (p, enqueued_event(p))
            else:
                settled.append((job_id, p.due_ms if p.verdict == "later" else None))
        if ready:
            settled += await self._send(broker, ready)
        await self._due.settle(slot, settled)

    async def _promote(self, job_id: str) -> Promotion:
        async with self._slots:
            return await self._due.promote(job_id, LEASE_MS)

    async def _send(
        self, broker: Broker, ready: dict[str, tuple[Promotion, Event]]
    ) -> list[tuple[str, int | None]]:
        """Publish the job messages and events of a batch; the entries done with."""
        started = time.monotonic()
        jobs = [(p.job, self._file.queue_for(p.job.job_type)) for p, _ in ready.values() if p.job]
        done: set[str] = set()
        try:
            await broker.publish_jobs(jobs, [e for _, e in ready.values()], done)
        except Unavailable as exc:
            self._rare.warn_rarely("scheduler-job", "scheduled jobs wait: %s", exc.message)
        took = time.monotonic() - started
        settled: list[tuple[str, int | None]] = []
        for job_id, (p, event) in ready.items():
            if job_id in done and event.provenance_id in done and p.job is not None:
                settled.append((job_id, None))
                self._m.scheduler_lateness.observe(max(0, p.server_ms - p.due_ms) / 1000 + took)
                jt = self._m.job_type_label(p.job.job_type)
                self._m.child(self._m.jobs_enqueued, jt, str(p.job.priority)).inc()
        return settled
