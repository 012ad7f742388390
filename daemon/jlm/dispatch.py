"""One request, from delivery to ack: parse and validate, decide in its scope's lane, publish,
answer. A passing fault pauses the request (never acks it); a lost session leaves it to be
redelivered."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiormq.exceptions import AMQPError

from jlm import otel
from jlm.amqp.lean import Incoming
from jlm.amqp.transport import UNDECODABLE
from jlm.broker import Broker
from jlm.config import OPERATIONS, Settings
from jlm.errors import (
    Disposition,
    Internal,
    InvalidRequest,
    JlmError,
    Unavailable,
    UnknownJobType,
)
from jlm.keys import scope_tag, tag_of_job
from jlm.lifecycle import Context, Lifecycle, Outcome
from jlm.metrics import Metrics
from jlm.protocol import (
    MAX_ID_LEN,
    CancelRequest,
    ManageRequest,
    Request,
    StatusRequest,
    parse_request,
    request_digest,
)
from jlm.retry import STEP_RETRY_START, Backoff, RareLog
from jlm.store import Store
from jlm.tracing import TraceContext, continue_or_start, current, using

log = logging.getLogger("jlm.service")  # the request lines keep their logger name
T = TypeVar("T")
LARGE_BODY = 1024 * 1024  # bytes: after such a request the freed heap is given back


class SessionLost(Exception):
    """The AMQP session of a delivery is gone: its message will be redelivered, so stop."""


class Dispatcher:
    """The requests of one daemon: counted in flight, decided one scope at a time."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        store: Store,
        lifecycle: Lifecycle,
        *,
        rare: RareLog,
        session_of: Callable[[Broker], str],
        on_redis_fault: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.lifecycle = lifecycle
        self._rare = rare
        self._session_of = session_of
        self._on_redis_fault = on_redis_fault
        self.inflight = 0
        self.handled = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.large_seen = False  # a large body was handled: the heap is trimmed at the next tick
        self._lanes: dict[str, asyncio.Future[None]] = {}
        self._admitted: set[str] = set()  # unconfigured job types known to have a place
        # Test hook: called after a decision is committed in Redis, before anything is published.
        self.after_decision: Callable[[Outcome], Awaitable[None]] | None = None

    async def on_message(self, broker: Broker, message: Incoming) -> None:
        started = time.perf_counter()
        op = message.routing_key or ""
        op_label = op if op in OPERATIONS else "unknown"
        ctx = Context(
            request_id=message.message_id or uuid.uuid4().hex,
            idempotent=bool(message.message_id),
            actor=message.user_id,
            reply_to=message.reply_to,
            redelivered_in=self._session_of(broker) if message.redelivered else "",
        )
        self.inflight += 1
        self.idle.clear()
        self.metrics.inflight.inc()
        outcome_label = "error"  # unless _serve returns: a lost session, or a defect
        # Every log line of this request carries its trace id (jlm.tracing.TraceFilter).
        trace = continue_or_start(message.headers)
        try:
            # With OpenTelemetry, the request's span; its context is what goes on.
            with (
                otel.span(
                    f"jlm {op_label}", trace, kind="consumer", attributes=_attrs(op, ctx)
                ) as sent,
                using(sent),
            ):
                outcome_label = await self._serve(broker, message, op, ctx, sent or trace)
        except SessionLost:
            pass
        finally:
            if len(message.body) >= LARGE_BODY:
                self.large_seen = True  # trimmed at the next tick, once this body is freed
            self.inflight -= 1
            self.handled += 1
            self.metrics.inflight.dec()
            if self.inflight == 0:
                self.idle.set()
            m = self.metrics
            m.child(m.requests, op_label, outcome_label).inc()
            m.child(m.request_duration, op_label).observe(time.perf_counter() - started)

    async def _serve(
        self,
        broker: Broker,
        message: Incoming,
        op: str,
        ctx: Context,
        trace: TraceContext,
    ) -> str:
        """Decide, publish and answer one request; its metric outcome.

        The request's trace context goes onto its job message, its events and its reply.
        """
        headers = trace.headers()
        try:
            request, ctx = self._parse(message, op, ctx)
        except JlmError as exc:
            await self._reject(broker, message, op, exc, ctx)
            return exc.outcome
        with otel.span("decision"):
            outcome = await self._decide_in_lane(broker, op, request, ctx)
        if isinstance(outcome, JlmError):
            if outcome.disposition is Disposition.DEAD_LETTER:
                await self._reject(broker, message, op, outcome, ctx)
            else:
                error = {"code": outcome.code, "message": outcome.message}
                await self._answer(broker, message, {"success": False, "error": error}, headers)
            return outcome.outcome
        confirmed: set[str] = set()  # what an earlier attempt got confirmed
        with otel.span("publish", kind="producer"):
            await self._retry(
                broker,
                lambda: broker.publish_decision(
                    outcome.job, outcome.queue, outcome.events, confirmed, headers=headers
                ),
            )
        self.lifecycle.published(outcome)
        await self._answer(broker, message, outcome.reply, headers)
        job_id = outcome.job.job_id if outcome.job is not None else outcome.reply.get("job_id")
        log.debug(
            "%s request %s answered (job %s)",
            op,
            ctx.request_id[:64],
            job_id,
            extra={"request_id": ctx.request_id[:256], "job_id": job_id, "op": op},
        )
        return "ok"

    def _parse(self, message: Incoming, op: str, ctx: Context) -> tuple[Request, Context]:
        """The request and its context (with its digest); a JlmError for one never valid."""
        undecodable = (message.headers or {}).get(UNDECODABLE)
        if undecodable is not None:
            self.metrics.poison_messages.inc()
            raise InvalidRequest(
                "the request's AMQP properties cannot be decoded: " + str(undecodable)
            )
        if len(ctx.request_id) > MAX_ID_LEN:
            raise InvalidRequest(f"message_id is longer than {MAX_ID_LEN} characters")
        request = parse_request(op, message.body, self.settings.file.max_request_bytes)
        self.lifecycle.validate(op, request, ctx)
        if ctx.idempotent:
            ctx = dataclasses.replace(ctx, digest=request_digest(op, ctx.actor, message.body))
        return request, ctx

    async def _admit(self, broker: Broker, job_type: str) -> None:
        """A job type's queue exists before its first decision.

        An unconfigured job type first needs a place among the namespace's `max_job_types`
        (UnknownJobType without one); a declaration the broker refuses is QueueRefused. Either
        way the request is rejected before anything is written for it. Called in the request's
        lane, so that the requests of a scope are still decided in delivery order.
        """
        file = self.settings.file
        if job_type not in file.job_types and job_type not in self._admitted:
            limit = file.max_job_types
            if not await self._retry(
                broker,
                lambda: self.store.admit_job_type(
                    job_types=self.store.keys.job_types, job_type=job_type, limit=limit
                ),
            ):
                raise UnknownJobType(
                    f"job type {job_type!r} is not configured, and {limit} unconfigured job "
                    "types (max_job_types) already have a queue"
                )
            self._admitted.add(job_type)
        queue = file.queue_for(job_type)
        await self._retry(broker, lambda: broker.ensure_job_queue(queue, job_type))

    async def _decide_in_lane(
        self,
        broker: Broker,
        op: str,
        request: Request,
        ctx: Context,
    ) -> Outcome | JlmError:
        """Requests of one scope are decided one at a time, in delivery order."""
        key = _lane_key(request)
        previous = self._lanes.get(key)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lanes[key] = mine
        try:
            if previous is not None:
                await asyncio.shield(previous)
            try:
                if isinstance(request, ManageRequest):
                    await self._admit(broker, request.job_type)
                outcome = await self._retry(broker, lambda: self.lifecycle.handle(op, request, ctx))
            except SessionLost:
                raise
            except JlmError as exc:
                return exc
            except Exception as exc:
                log.exception("internal error on %s request %s", op, ctx.request_id)
                return Internal(f"internal error: {type(exc).__name__}")
            if self.after_decision is not None:
                await self.after_decision(outcome)
            return outcome
        finally:
            mine.set_result(None)
            if self._lanes.get(key) is mine:
                del self._lanes[key]

    async def _retry(self, broker: Broker, step: Callable[[], Awaitable[T]]) -> T:
        """Run a step until it succeeds; a passing fault pauses this request, never acks it."""
        backoff = Backoff(STEP_RETRY_START, self.settings.retry_max_delay)
        while True:
            if broker.closed.is_set():
                raise SessionLost
            try:
                return await step()
            except Unavailable as exc:
                self.metrics.retries.labels(dependency=exc.dependency).inc()
                if exc.dependency == "redis":
                    self._on_redis_fault(exc.message)
                self._rare.warn_rarely(
                    exc.dependency, "waiting for %s: %s", exc.dependency, exc.message
                )
                await asyncio.sleep(backoff.next())

    async def _reject(
        self,
        broker: Broker,
        message: Incoming,
        op: str,
        error: JlmError,
        ctx: Context,
    ) -> None:
        trace = current()
        headers = trace.headers() if trace is not None else {}
        self._rare.warn_rarely(
            "reject:" + error.code,
            "rejected %s request %s: %s: %s",
            op[:64] or "(no operation)",
            ctx.request_id[:64],
            error.code,
            error.message[:300],
        )
        outcome = self.lifecycle.rejected(op, error, ctx, len(message.body))

        confirmed: set[str] = set()
        dead_lettered = False

        async def publish() -> None:
            nonlocal dead_lettered
            if not dead_lettered:
                await broker.dead_letter(message, error.code, error.message)
                dead_lettered = True
            await broker.publish_decision(None, None, outcome.events, confirmed, headers=headers)

        await self._retry(broker, publish)
        self.metrics.dead_lettered.labels(code=error.code).inc()
        # Never a reply to a queue outside the caller's grant, whatever else was wrong.
        send = error.replies and self.lifecycle.reply_allowed(ctx)
        await self._answer(broker, message, outcome.reply, headers, send_reply=send)

    async def _answer(
        self,
        broker: Broker,
        message: Incoming,
        reply: dict[str, Any],
        headers: dict[str, str],
        *,
        send_reply: bool = True,
    ) -> None:
        if message.reply_to and send_reply:
            await broker.reply(message.reply_to, message.correlation_id, reply, headers)
        try:
            await broker.ack(message)
        except (AMQPError, OSError, RuntimeError) as exc:
            # The channel of this delivery is gone; the broker redelivers it and the
            # recorded decision is replayed. Never ack on another channel.
            log.info("ack lost with its channel (%s); the request will be replayed", exc)
            raise SessionLost from exc


def _attrs(op: str, ctx: Context) -> dict[str, str]:
    """The request span's attributes (OpenTelemetry's messaging conventions)."""
    return {
        "messaging.system": "rabbitmq",
        "messaging.operation.name": op[:64],
        "messaging.message.id": ctx.request_id[:256],
    }


def _lane_key(request: Request) -> str:
    if isinstance(request, CancelRequest | StatusRequest):
        return tag_of_job(request.job_id) or "-"
    return scope_tag(request.cache_prefix, request.job_type)
