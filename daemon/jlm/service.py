"""The daemon: lifespan, consume, dispatch in per-scope lanes, retries, drain."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import signal
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import AMQPError

from jlm import __version__
from jlm.amqp.names import REQUESTS
from jlm.amqp.transport import UNDECODABLE
from jlm.broker import Broker
from jlm.config import OPERATIONS, Settings, redact_url
from jlm.errors import (
    Disposition,
    Internal,
    InvalidRequest,
    JlmError,
    Refused,
    Unavailable,
    UnknownJobType,
)
from jlm.http_server import HttpServer
from jlm.keys import Keys, scope_tag, tag_of_job
from jlm.lifecycle import Context, Lifecycle, Outcome
from jlm.metrics import OTHER, HealthState, Metrics
from jlm.protocol import (
    MAX_ID_LEN,
    CancelRequest,
    ManageRequest,
    Request,
    StatusRequest,
    parse_request,
    request_digest,
)
from jlm.store import Store, connect
from jlm.systemd import Notifier, watchdog_loop

log = logging.getLogger(__name__)
T = TypeVar("T")
SESSION_SETTLED = 10.0  # seconds: a broker session lost sooner failed (backoff, then prefetch 1)
LARGE_BODY = 1024 * 1024  # bytes: after such a request the freed heap is given back (see _trim)


class SessionLost(Exception):
    """The AMQP session of a delivery is gone: its message will be redelivered, so stop."""


class Service:
    """One daemon instance."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(
            max_job_types=settings.file.max_job_types, configured=settings.file.job_types
        )
        self.notifier = notifier or Notifier.from_env()
        self.health = HealthState()
        self.store = Store(
            connect(
                settings.redis_url,
                cluster=settings.redis_cluster,
                ca_file=_str(settings.tls_ca_file),
                cert_file=_str(settings.tls_cert_file),
                key_file=_str(settings.tls_key_file),
                verify=settings.tls_verify,
                max_connections=settings.redis_max_connections,
            ),
            Keys(settings.redis_namespace),
            self.metrics,
            settings.redis_max_connections,
        )
        self.lifecycle = Lifecycle(self.store, settings, self.metrics)
        host, port = settings.metrics_host_port
        self.http = HttpServer(self.metrics, self.health, host, port)
        self.broker: Broker | None = None
        self.stopping = asyncio.Event()
        self.started = asyncio.Event()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._handled = 0
        self._idle.set()
        self._lanes: dict[str, asyncio.Future[None]] = {}
        # A unique name per broker session: redelivered requests republish once per session.
        self._session_ids: weakref.WeakKeyDictionary[Broker, str] = weakref.WeakKeyDictionary()
        self._unready_since: float | None = time.monotonic()
        self._last_warning: dict[str, float] = {}
        self._large_seen = False
        # Redis refused a write (or was down): readiness then also needs a write to pass.
        self._redis_check_writes = False
        self._admitted: set[str] = set()  # unconfigured job types known to have a place
        self._other_queues = False  # some job queue's depth is reported as queue="other"
        # Test hook: called after a decision is committed in Redis, before anything is published.
        self.after_decision: Callable[[Outcome], Awaitable[None]] | None = None
        for dep in ("redis", "rabbitmq"):
            self.metrics.dependency_up.labels(dependency=dep).set(0)

    # -- lifespan --------------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = True) -> None:
        """Run until SIGTERM/SIGINT (or `stop()`), then drain. A second signal stops at once."""
        await self.http.start()
        log.info(
            "job-lifecycle-manager %s starting: broker %s, redis %s, namespace %r",
            __version__,
            ", ".join(redact_url(u) for u in self.settings.amqp_urls),
            redact_url(self.settings.redis_url),
            self.settings.redis_namespace,
        )
        try:
            async with anyio.create_task_group() as tg:
                if handle_signals:
                    tg.start_soon(self._signals, tg.cancel_scope)
                tg.start_soon(self._monitor)
                tg.start_soon(self._watch_broker)
                tg.start_soon(watchdog_loop, self.notifier, self._healthy)
                await self._sessions()
                tg.cancel_scope.cancel()
        finally:
            if self.broker is not None:
                await self.broker.close()
            await self.http.stop()
            await self.store.close()
            log.info("stopped")

    def stop(self) -> None:
        self.stopping.set()

    async def _signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if not self.stopping.is_set():
                    log.info(
                        "%s: draining (a second signal stops at once)", signal.Signals(signum).name
                    )
                    self.stopping.set()
                else:
                    log.warning("second signal: stopping now; unacked requests will be redelivered")
                    scope.cancel()
                    return

    async def _sessions(self) -> None:
        delay = 0.2
        while not self.stopping.is_set():
            broker = Broker(self.settings, self.metrics)
            self._session_ids[broker] = uuid.uuid4().hex
            try:
                await broker.open()
            except Unavailable as exc:
                if isinstance(exc, Refused) and not self.started.is_set():
                    raise  # settings that never worked: exit 78 (docs/operations.md)
                self._dependency("rabbitmq", False, exc.message)
                # Also once the broker is known to be down: a node that accepts the connection
                # but fails the topology (e.g. a classic queue whose cluster node is gone) would
                # otherwise leave only "connected to ..." lines, with no reason.
                self._warn_rarely("rabbitmq-session", "no broker session: %s", exc.message)
                await self._sleep_unless_stopping(delay)
                delay = min(delay * 2, self.settings.retry_max_delay)
                continue
            opened = time.monotonic()
            self.broker = broker
            self._dependency("rabbitmq", True)
            handler = functools.partial(self._on_message, broker)
            # After a session lost as soon as it opened, one request at a time: if a request
            # kills sessions (the AMQP library cannot decode it), only its own delivery count
            # grows, not that of every request prefetched with it.
            probation = delay > 0.2
            await broker.consume(handler, prefetch=1 if probation else None)
            self._update_health()
            if not self.started.is_set():
                self.started.set()
                self.notifier.ready(f"consuming {REQUESTS}")
            log.info(
                "consuming %s (prefetch %d)", REQUESTS, 1 if probation else self.settings.prefetch
            )
            if probation and not await self._session_ends(broker, SESSION_SETTLED):
                await broker.stop_consuming()
                await broker.consume(handler, prefetch=self.settings.prefetch)
                log.info("consuming %s (prefetch %d)", REQUESTS, self.settings.prefetch)
            await self._session_ends(broker)
            if self.stopping.is_set() and not broker.closed.is_set():
                await self._drain(broker)
                return
            self._dependency("rabbitmq", False, "connection lost; reconnecting")
            self._update_health()
            await broker.close()
            if time.monotonic() - opened < SESSION_SETTLED:
                # Lost as soon as it opened (e.g. a request the AMQP library cannot decode, back
                # at the head of the queue): back off, or it becomes a reconnect storm.
                await self._sleep_unless_stopping(delay)
                delay = min(delay * 2, self.settings.retry_max_delay)
            else:
                delay = 0.2

    async def _session_ends(self, broker: Broker, within: float | None = None) -> bool:
        """Wait until stopping or the session is lost (True), or `within` seconds (False)."""
        stop_wait = asyncio.ensure_future(self.stopping.wait())
        lost_wait = asyncio.ensure_future(broker.closed.wait())
        done, _ = await asyncio.wait(
            {stop_wait, lost_wait}, timeout=within, return_when=asyncio.FIRST_COMPLETED
        )
        stop_wait.cancel()
        lost_wait.cancel()
        return bool(done)

    async def _drain(self, broker: Broker) -> None:
        timeout = self.settings.shutdown_timeout
        self.notifier.stopping(f"draining {self._inflight} in-flight requests")
        # Ask systemd for the drain's time (plus a margin for closing) beyond its stop timeout.
        self.notifier.extend_timeout(timeout + 5)
        await broker.stop_consuming()
        self._update_health()
        log.info("draining: %d requests in flight, up to %.0fs", self._inflight, timeout)
        with anyio.move_on_after(timeout) as scope:
            await self._idle.wait()
        if scope.cancelled_caught:
            log.warning(
                "drain timed out with %d in flight; they will be redelivered", self._inflight
            )
        await broker.close()

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self.stopping.wait()

    # -- health ----------------------------------------------------------------------------------

    async def _monitor(self) -> None:
        """Every second: a real script call on Redis, and the consumer's state; queue depths."""
        tick = 0
        while True:
            try:
                with anyio.fail_after(2):
                    await self.store.ping_script()
                    if self._redis_check_writes:
                        await self.store.ping_write()
                        self._redis_check_writes = False
                self._dependency("redis", True)
            except (Unavailable, TimeoutError) as exc:
                self._dependency("redis", False, str(exc))
            except Exception as exc:  # a script error is "not ready", never a crash
                self._dependency("redis", False, f"script call failed: {exc}")
            self._update_health()
            if tick % 5 == 0:
                self.notifier.status(
                    f"{self._status_line()}; {self._handled} requests handled, "
                    f"{self._inflight} in flight"
                )
            if tick % 10 == 0 and self.broker is not None:
                await self._sample_queues(self.broker)
            if self._large_seen:
                self._large_seen = False
                _trim()
            tick += 1
            await anyio.sleep(1)

    async def _watch_broker(self) -> None:
        """A round trip every second: a stalled connection ends its session in two heartbeats."""
        heartbeat = self.settings.heartbeat
        while heartbeat:
            await anyio.sleep(1)
            if self.broker is not None:
                await self.broker.probe(2 * heartbeat)

    async def _sample_queues(self, broker: Broker) -> None:
        """jlm_queue_messages: the request queue and the job queues this session declared.

        An unconfigured job type whose label is `other` adds its queue to the `other` series.
        """
        file = self.settings.file
        own = {REQUESTS, *(file.queue_for(t) for t in file.job_types)}
        depths = await broker.queue_depths([REQUESTS, *sorted(broker.job_queues)])
        other = 0
        for queue, depth in depths.items():
            if queue in own or self.metrics.job_type_label(_job_type_of(queue)) != OTHER:
                self.metrics.queue_depth.labels(queue=queue).set(depth)
            else:
                other += depth
        if other or self._other_queues:
            self._other_queues = True
            self.metrics.queue_depth.labels(queue=OTHER).set(other)

    def _dependency(self, name: str, up: bool, why: str = "") -> None:
        self.metrics.dependency_up.labels(dependency=name).set(1 if up else 0)
        was = self.health.checks.get(name)
        self.health.set(name, up)
        if was is not up:
            if up:
                log.info("%s is up", name)
            else:
                log.warning("%s is down: %s", name, redact_url(why)[:300])
            self.notifier.status(self._status_line())

    def _update_health(self) -> None:
        consuming = self.broker is not None and self.broker.consuming
        self.health.set("consuming", consuming)
        if self.health.ready:
            self._unready_since = None
        elif self._unready_since is None:
            self._unready_since = time.monotonic()

    def _status_line(self) -> str:
        parts = [f"{k} {'up' if v else 'DOWN'}" for k, v in sorted(self.health.checks.items())]
        return f"{'ready' if self.health.ready else 'NOT READY'}: {', '.join(parts)}"

    def _healthy(self) -> bool:
        """Watchdog pings stop when the daemon has been unable to work for too long."""
        since = self._unready_since
        return since is None or time.monotonic() - since < self.settings.watchdog_unready_limit

    def _warn_rarely(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_warning.get(key, 0.0) >= 5.0:
            self._last_warning[key] = now
            log.warning(msg, *args)

    # -- one request -----------------------------------------------------------------------------

    async def _on_message(self, broker: Broker, message: AbstractIncomingMessage) -> None:
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
        self._inflight += 1
        self._idle.clear()
        self.metrics.inflight.inc()
        outcome_label = "ok"
        try:
            try:
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
                    digest = request_digest(op, ctx.actor, message.body)
                    ctx = dataclasses.replace(ctx, digest=digest)
            except JlmError as exc:
                outcome_label = exc.outcome
                await self._reject(broker, message, op, exc, ctx)
                return
            outcome = await self._decide_in_lane(broker, op, request, ctx)
            if isinstance(outcome, JlmError):
                outcome_label = outcome.outcome
                if outcome.disposition is Disposition.DEAD_LETTER:
                    await self._reject(broker, message, op, outcome, ctx)
                else:
                    await self._answer(
                        broker,
                        message,
                        {
                            "success": False,
                            "error": {"code": outcome.code, "message": outcome.message},
                        },
                    )
                return
            confirmed: set[str] = set()  # what an earlier attempt got confirmed
            await self._retry(
                broker,
                lambda: broker.publish_decision(
                    outcome.job,
                    outcome.queue,
                    outcome.events,
                    confirmed,
                ),
            )
            self.lifecycle.published(outcome)
            await self._answer(broker, message, outcome.reply)
        except SessionLost:
            outcome_label = "error"
        finally:
            if len(message.body) >= LARGE_BODY:
                self._large_seen = True  # trimmed at the next tick, once this body is freed
            self._inflight -= 1
            self._handled += 1
            self.metrics.inflight.dec()
            if self._inflight == 0:
                self._idle.set()
            m = self.metrics
            m.child(m.requests, op_label, outcome_label).inc()
            m.child(m.request_duration, op_label).observe(time.perf_counter() - started)

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
            if not await self._retry(broker, lambda: self.store.admit_job_type(job_type, limit)):
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

    def _session_of(self, broker: Broker) -> str:
        """The unique name of a broker session (a fresh one if unknown: that republishes)."""
        return self._session_ids.get(broker) or uuid.uuid4().hex

    async def _retry(self, broker: Broker, step: Callable[[], Awaitable[T]]) -> T:
        """Run a step until it succeeds; a passing fault pauses this request, never acks it."""
        delay = 0.05
        while True:
            if broker.closed.is_set():
                raise SessionLost
            try:
                return await step()
            except Unavailable as exc:
                self.metrics.retries.labels(dependency=exc.dependency).inc()
                if exc.dependency == "redis":
                    self._redis_check_writes = True
                    self._dependency("redis", False, exc.message)
                    self._update_health()
                self._warn_rarely(exc.dependency, "waiting for %s: %s", exc.dependency, exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max_delay)

    async def _reject(
        self,
        broker: Broker,
        message: AbstractIncomingMessage,
        op: str,
        error: JlmError,
        ctx: Context,
    ) -> None:
        self._warn_rarely(
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
            await broker.publish_decision(None, None, outcome.events, confirmed)

        await self._retry(broker, publish)
        self.metrics.dead_lettered.labels(code=error.code).inc()
        # Never a reply to a queue outside the caller's grant, whatever else was wrong.
        send = error.replies and self.lifecycle.reply_allowed(ctx)
        await self._answer(broker, message, outcome.reply, send_reply=send)

    async def _answer(
        self,
        broker: Broker,
        message: AbstractIncomingMessage,
        reply: dict[str, Any],
        *,
        send_reply: bool = True,
    ) -> None:
        if message.reply_to and send_reply:
            await broker.reply(message.reply_to, message.correlation_id, reply)
        try:
            await broker.ack(message)
        except (AMQPError, OSError, RuntimeError) as exc:
            # The channel of this delivery is gone; the broker redelivers it and the
            # recorded decision is replayed. Never ack on another channel.
            log.info("ack lost with its channel (%s); the request will be replayed", exc)
            raise SessionLost from exc


def _job_type_of(queue: str) -> str:
    """The job type of an unconfigured type's queue (`jlm.jobs.<job_type>`)."""
    return queue.removeprefix("jlm.jobs.")


def _lane_key(request: Request) -> str:
    if isinstance(request, CancelRequest | StatusRequest):
        return tag_of_job(request.job_id) or "-"
    return scope_tag(request.cache_prefix, request.job_type)


def _libc_trim() -> Callable[[], None]:
    name = ctypes.util.find_library("c")
    try:
        malloc_trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        malloc_trim = None
    if malloc_trim is None:
        return lambda: None

    def trim() -> None:
        malloc_trim(0)

    return trim


# glibc keeps the heap pages of freed message bodies (a body arrives in 128 KiB frames, below
# its mmap threshold): after large requests, give them back, or a burst of rejected 8 MiB
# requests would leave the daemon hundreds of MB larger. A no-op without glibc.
_trim = _libc_trim()


def _str(path: Any) -> str | None:
    return None if path is None else str(path)
