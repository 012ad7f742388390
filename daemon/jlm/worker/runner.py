"""The outcome of one claim: a job run from start to end (handler, heartbeat, cancellation,
result or release), or a message skipped, or a lost worker's job recorded."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

import orjson
from pydantic import ValidationError

from jlm import otel
from jlm.config import Settings, redact_url
from jlm.errors import Unavailable
from jlm.metrics import Metrics
from jlm.provenance import Event
from jlm.retry import STEP_RETRY_START, Backoff
from jlm.tracing import current, using
from jlm.worker.job import Active, ReceivedJob, job_extra, now, worker_event
from jlm.worker.progress import Progress
from jlm.worker.registry import Route
from jlm.worker.store import Facts, Outcome, WorkerStore

log = logging.getLogger(__name__)
T = TypeVar("T")

Settle = Literal["ack", "requeue", "keep"]  # keep: leave unacked, the broker redelivers it


@dataclass(frozen=True, slots=True)
class Deps:
    """What a run needs from its worker."""

    settings: Settings
    store: WorkerStore
    metrics: Metrics
    emit: Callable[[Event], Awaitable[None]]
    republish: Callable[[ReceivedJob, int], Awaitable[bool]]
    abandon: Callable[[asyncio.Task[Any], str], None]
    warn: Callable[[str, str, str], None]
    stopping: asyncio.Event
    give_up: asyncio.Event  # set at exit: stop retrying Redis and the broker
    lease_ms: int
    cancel_grace: float
    worker_id: str


async def first_of(*aws: Coroutine[Any, Any, Any]) -> None:
    """Return when the first of `aws` is done; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class JobRunner:
    """Runs one claimed job to its end and says what becomes of its message."""

    def __init__(
        self,
        deps: Deps,
        active: Active,
        msg: ReceivedJob,
        claimed: asyncio.Task[None],
        later: list[Awaitable[None]],
        *,
        route: Route,
        claimed_facts: Facts,
    ) -> None:
        self._later = later  # the outcome's event: published once the message is settled
        self._d = deps
        self._route = route
        self._active = active
        self._job = active.job
        self._msg = msg
        self._claimed = claimed
        self._started = time.monotonic()
        self._progress = Progress(
            deps.store, deps.emit, deps.worker_id, active, claimed, claimed_facts.get("request_id")
        )
        self._job = active.job = dataclasses.replace(active.job, _report=self._progress.report)
        # The job type's settings: the worker's own when its configuration names the job type,
        # else as the daemon recorded them on the job, else the defaults.
        jt = deps.settings.file.job_types.get(self._job.job_type)
        f = claimed_facts
        self._max_attempts = int(f.get("max_attempts") or 1)
        self._result_ttl = (
            jt.result_ttl
            if jt is not None
            else int(f.get("result_ttl") or deps.settings.file.default_result_ttl)
        )
        recorded = f.get("retry_backoff")
        self._backoff = (
            jt.retry_backoff if jt is not None else float(1 if recorded is None else recorded)
        )
        self._label = deps.metrics.job_type_label(self._job.job_type)
        self._scope = (self._job.cache_prefix, self._job.job_type)

    async def run(self) -> Settle:
        job = self._job
        log.info(
            "job %s started: %s/%s, attempt %d",
            job.id,
            job.cache_prefix,
            job.job_type,
            job.attempt,
            extra=job_extra(job),
        )
        invalid = self._typed_payload()
        if invalid is not None:  # it would fail every attempt: failed at once
            return await self._finish("rejected", invalid)
        task = asyncio.create_task(self._call(), name=f"jlm job {job.id}")
        heartbeat = asyncio.create_task(self._heartbeat())
        waiter = asyncio.ensure_future(self._active.interrupted.wait())
        abandoned = False
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                outcome, value = self._outcome(task)
                return await self._finish(outcome, value)
            abandoned = await self._stop_handler(task)
            return await self._interrupted(abandoned, time.time())
        finally:
            waiter.cancel()
            heartbeat.cancel()
            if not task.done() and not abandoned:  # this run itself was cancelled
                task.cancel()

    # -- the handler -----------------------------------------------------------------------------

    async def _call(self) -> Any:
        # With OpenTelemetry, the run's span: the handler's own spans are its children.
        job = self._job
        attrs = {"jlm.job_id": job.id, "jlm.attempt": job.attempt}
        with (
            otel.span(
                f"jlm job {job.job_type}", current(), kind="consumer", attributes=attrs
            ) as ctx,
            using(ctx),
        ):
            return await self._route.handler(job)

    def _typed_payload(self) -> str | None:
        """Make the job's payload an instance of its type's model; the error when it is not one."""
        model = self._route.payload
        if model is None:
            return None
        try:
            payload = model.model_validate(self._job.payload)
        except ValidationError as exc:
            log.warning(
                "job %s: invalid payload: %s", self._job.id, exc, extra=job_extra(self._job)
            )
            return redact_url(f"invalid payload: {exc}")[:2000]
        self._job = self._active.job = dataclasses.replace(self._job, payload=payload)
        return None

    def _outcome(self, task: asyncio.Task[Any]) -> tuple[Outcome, str]:
        if task.cancelled():
            return "failed", "CancelledError: the handler's task was cancelled"
        exc = task.exception()
        if exc is not None:
            # Passwords hidden in what is logged (the traceback in the message: a worker embedded
            # in an application logs through that application's formatters, which hide nothing)
            # and in the error kept on the job's record, its event and `status`.
            shown = redact_url(f"{type(exc).__name__}: {exc}")
            log.warning(
                "job %s attempt %d failed: %s\n%s",
                self._job.id,
                self._job.attempt,
                shown,
                redact_url("".join(traceback.format_exception(exc))).rstrip(),
                extra=job_extra(self._job),
            )
            return "failed", shown[:2000]
        try:
            return "succeeded", orjson.dumps(task.result()).decode()
        except TypeError as exc:
            return "failed", f"the result is not JSON-serialisable: {exc}"[:2000]

    async def _stop_handler(self, task: asyncio.Task[Any]) -> bool:
        """Cancel the handler; True when it ignored that for the grace period (abandoned)."""
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=self._d.cancel_grace)
        if done:
            if not task.cancelled():
                task.exception()  # retrieved: a stopped handler's error is not news
            return False
        log.warning(
            "handler of job %s ignored cancellation for %.1fs: abandoned",
            self._job.id,
            self._d.cancel_grace,
            extra=job_extra(self._job),
        )
        self._d.metrics.handlers_abandoned.labels(job_type=self._label).inc()
        self._d.abandon(task, self._job.id)
        return True

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._d.lease_ms / 3000)
            if not await beat(self._d, self._active):
                return

    # -- the end of a run ------------------------------------------------------------------------

    async def _finish(self, outcome: Outcome, value: str) -> Settle:
        job, d = self._job, self._d
        facts = await self._redis(
            lambda: d.store.finish(
                self._active.run,
                self._scope,
                outcome,
                now(),
                value,
                result_ttl=self._result_ttl,
                max_attempts=self._max_attempts,
            )
        )
        if facts is None:
            return "keep"
        duration = time.monotonic() - self._started
        base = {"worker": d.worker_id, "attempt": job.attempt}
        if facts.o == "succeeded":
            cached = bool(facts.get("cached"))
            self._count("succeeded", duration)
            if not cached:
                d.metrics.zombie_completions.labels(job_type=self._label).inc()
                log.info("job %s superseded while running: result not cached", job.id)
            out: dict[str, Any] = {"cached": cached, "duration_s": round(duration, 6)}
            await self._emit("job.succeeded", "succeeded", facts, base, out)
        elif facts.o == "retry":
            delay = self._backoff * 2 ** (job.attempt - 1)
            self._count("retried", duration)
            out = {"error": value, "retry_in_s": delay, "max_attempts": self._max_attempts}
            await self._emit("job.failed", "pending", facts, base, out)
            await first_of(d.stopping.wait(), asyncio.sleep(delay))
            return "ack" if await d.republish(self._msg, int(facts.get("gen", 0))) else "keep"
        elif facts.o == "failed":
            self._count("failed", duration)
            await self._emit("job.failed", "failed", facts, base, {"error": value})
        elif facts.o == "stopped":  # cancelled while running; what the handler produced is refused
            if facts.get("refused"):
                d.metrics.zombie_completions.labels(job_type=self._label).inc()
            await self._stopped(facts, time.time(), {"result_refused": bool(facts.get("refused"))})
        else:
            if outcome == "succeeded":
                d.metrics.zombie_completions.labels(job_type=self._label).inc()
            log.warning(
                "job %s: this run no longer holds the job (%s); its %s was refused",
                job.id,
                facts.state,
                "result" if outcome == "succeeded" else "error",
                extra=job_extra(job),
            )
        return "ack"

    async def _interrupted(self, abandoned: bool, stopped_at: float) -> Settle:
        job, d, reason = self._job, self._d, self._active.reason
        note = "stopped by worker"
        if abandoned:
            note += f" (handler abandoned after {d.cancel_grace:g}s)"
        if reason == "lost":
            log.warning("job %s: this run lost its claim; stopped", job.id, extra=job_extra(job))
            return "ack"
        if reason == "cancelled":
            facts = await self._redis(
                lambda: d.store.finish(
                    self._active.run,
                    self._scope,
                    "stopped",
                    now(),
                    "",
                    result_ttl=self._result_ttl,
                    max_attempts=self._max_attempts,
                    stop_note=note,
                )
            )
        else:
            facts = await self._redis(
                lambda: d.store.release(self._active.run, now(), "released: worker stopping")
            )
        if facts is None:
            return "keep"
        if facts.o in ("stopped", "cancelled"):
            await self._stopped(facts, stopped_at, {"note": note, "abandoned": abandoned})
        elif facts.o == "released":
            self._count("released", time.monotonic() - self._started)
            await self._emit(
                "job.released", "pending", facts, {"worker": d.worker_id}, {"note": note}
            )
            return "requeue"
        return "ack"

    async def _stopped(self, facts: Facts, stopped_at: float, out: dict[str, Any]) -> None:
        asked = facts.get("cancel_requested")
        if asked:
            latency = stopped_at - datetime.fromisoformat(str(asked)).timestamp()
            if latency >= 0:
                self._d.metrics.cancel_latency.observe(latency)
                out["cancel_latency_s"] = round(latency, 6)
        self._count("cancelled", time.monotonic() - self._started)
        base = {"worker": self._d.worker_id, "attempt": self._job.attempt}
        await self._emit("job.cancelled", "cancelled", facts, base, out)

    # -- helpers ---------------------------------------------------------------------------------

    def _count(self, state: str, duration: float) -> None:
        """Count this run's outcome, and log it: with the start, one info line each per job."""
        job_id = self._job.id
        log.info("job %s %s after %.3fs", job_id, state, duration, extra=job_extra(self._job))
        if state in ("succeeded", "failed", "cancelled"):
            self._d.metrics.jobs_finished.labels(job_type=self._label, state=state).inc()
        self._d.metrics.job_duration.labels(job_type=self._label, state=state).observe(duration)

    async def _emit(self, type_: str, status: str, facts: Facts, input_: Any, output: Any) -> None:
        """Queue the event of this run's outcome, after the claim's event.

        It is published (and confirmed) once the message is settled: a redelivered message
        cannot bring back an event lost in a crash anyway (the next claim finds the job
        finished), so waiting for the confirm before the ack would only slow every job down.
        """
        event = worker_event(
            type_,
            status,
            self._job.id,
            self._scope,
            request_id=facts.get("request_id"),
            input_=input_,
            output=output,
        )
        self._later.append(self._after_claimed(event))

    async def _after_claimed(self, event: Event) -> None:
        await self._claimed
        await self._progress.published()
        await self._d.emit(event)

    async def _redis(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """Retry a passing Redis fault; None once the worker gives up at exit."""
        return await retry_redis(self._d, call)


async def retry_redis(d: Deps, call: Callable[[], Awaitable[T]]) -> T | None:
    backoff = Backoff(STEP_RETRY_START, d.settings.retry_max_delay)
    while True:
        try:
            return await call()
        except Unavailable as exc:
            if d.give_up.is_set():
                log.error("redis unavailable at exit: %s", exc.message)
                return None
            d.warn("redis", "waiting for redis: %s", exc.message)
            await first_of(d.give_up.wait(), asyncio.sleep(backoff.next()))


async def beat(d: Deps, active: Active) -> bool:
    """Renew the lease; False (and the run interrupted) when the job is no longer ours to run."""
    try:
        state = await d.store.heartbeat(active.run, d.lease_ms)
    except Unavailable as exc:
        d.warn("redis", "heartbeat: redis unavailable: %s", exc.message)
        return True
    if state == "running":
        return True
    active.interrupt("cancelled" if state == "cancelled" else "lost")
    return False


def unclaimed(d: Deps, msg: ReceivedJob, facts: Facts) -> Event:
    """Count a claim that ran nothing (a skipped message, or a lost worker's job); its event."""
    scope = (facts.get("cache_prefix"), facts.get("job_type"))
    label = d.metrics.job_type_label(facts.get("job_type") or msg.job_type)
    request_id = facts.get("request_id")
    if facts.o == "skip":
        reason = str(facts.get("reason"))
        d.metrics.jobs_skipped.labels(job_type=label, reason=reason).inc()
        log.debug("skipped job %s: %s", msg.job_id, reason, extra={"job_id": msg.job_id})
        info = {"worker": d.worker_id, "reason": reason}
        return worker_event(
            "job.skipped",
            facts.state,
            msg.job_id,
            scope,
            request_id=request_id,
            input_=info,
            output=None,
        )
    # lost: its worker died and no attempt is left, or it was superseded meanwhile
    d.metrics.jobs_recovered.labels(job_type=label, outcome=facts.state).inc()
    d.metrics.jobs_finished.labels(job_type=label, state=facts.state).inc()
    log.warning(
        "job %s: its worker was lost; now %s", msg.job_id, facts.state, extra={"job_id": msg.job_id}
    )
    failed = facts.state == "failed"
    return worker_event(
        "job.failed" if failed else "job.cancelled",
        facts.state,
        msg.job_id,
        scope,
        request_id=request_id,
        input_={
            "worker": d.worker_id,
            "reason": "worker lost",
            "attempt": facts.get("attempt"),
        },
        output={"error": "worker lost"} if failed else None,
    )


def invalid(d: Deps, job_type: str, message_id: str | None) -> Event:
    """Count a message that is not a job message of ours (acked); its event."""
    label = d.metrics.job_type_label(job_type)
    d.metrics.jobs_skipped.labels(job_type=label, reason="invalid").inc()
    log.warning("skipped an invalid job message (message_id %r)", message_id)
    return worker_event(
        "job.skipped",
        "unknown",
        None,
        (None, None),
        request_id=None,
        input_={"worker": d.worker_id, "reason": "invalid", "message_id": message_id},
        output=None,
    )
