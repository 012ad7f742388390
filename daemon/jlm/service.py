"""The daemon: lifespan, broker sessions, health, drain; each request goes to `dispatch`."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import signal
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from jlm import __version__
from jlm.amqp.names import REQUESTS
from jlm.amqp.session import CLOSE_TIMEOUT
from jlm.broker import Broker
from jlm.config import Settings, redact_url
from jlm.dispatch import Dispatcher
from jlm.due import DueSets
from jlm.errors import (
    Refused,
    Unavailable,
)
from jlm.http_server import HttpServer
from jlm.keys import Keys
from jlm.lifecycle import Lifecycle, Outcome
from jlm.metrics import OTHER, HealthState, Metrics
from jlm.retry import RECONNECT_START, Backoff, RareLog
from jlm.scheduler import Scheduler
from jlm.store import Store, connect
from jlm.systemd import Notifier, watchdog_loop

log = logging.getLogger(__name__)
T = TypeVar("T")
SESSION_SETTLED = 10.0  # seconds: a broker session lost sooner failed (backoff, then prefetch 1)


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
        # A unique name per broker session: redelivered requests republish once per session.
        self._session_ids: weakref.WeakKeyDictionary[Broker, str] = weakref.WeakKeyDictionary()
        self._unready_since: float | None = time.monotonic()
        self._rare = RareLog(log)
        # Redis refused a write (or was down): readiness then also needs a write to pass.
        self._redis_check_writes = False
        self._other_queues = False  # some job queue's depth is reported as queue="other"
        self.requests = Dispatcher(
            settings,
            self.metrics,
            self.store,
            self.lifecycle,
            rare=self._rare,
            session_of=self._session_of,
            on_redis_fault=self._redis_fault,
        )
        # Publishes the scheduled jobs that are due (policy debounce, not_before).
        self.scheduler = Scheduler(
            settings,
            self.metrics,
            DueSets(self.store, settings.file.job_ttl),
            lambda: self.broker,
            rare=self._rare,
            stopping=self.stopping,
        )
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
                tg.start_soon(self.scheduler.run)
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
        backoff = Backoff(RECONNECT_START, self.settings.retry_max_delay, healthy=SESSION_SETTLED)
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
                await self._sleep_unless_stopping(backoff.next())
                continue
            opened = time.monotonic()
            self.broker = broker
            self._dependency("rabbitmq", True)
            handler = functools.partial(self.requests.on_message, broker)
            # After a session lost as soon as it opened, one request at a time: if a request
            # kills sessions (the AMQP library cannot decode it), only its own delivery count
            # grows, not that of every request prefetched with it.
            probation = backoff.raised
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
            if not backoff.settled(time.monotonic() - opened):
                # Lost as soon as it opened (e.g. a request the AMQP library cannot decode, back
                # at the head of the queue): back off, or it becomes a reconnect storm.
                await self._sleep_unless_stopping(backoff.next())

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
        self.notifier.stopping(f"draining {self.requests.inflight} in-flight requests")
        # Ask systemd for the drain's time (plus a margin for closing) beyond its stop timeout.
        self.notifier.extend_timeout(timeout + CLOSE_TIMEOUT)
        log.info("draining: %d requests in flight, up to %.0fs", self.requests.inflight, timeout)
        # The whole drain, the consumer's cancel included: on a connection gone silent that
        # cancel waits until aiormq gives the connection up (3 heartbeats), far past the bound.
        with anyio.move_on_after(timeout) as scope:
            await broker.stop_consuming()
            self._update_health()
            await self.requests.idle.wait()
        if scope.cancelled_caught and self.requests.inflight:
            log.warning(
                "drain timed out with %d in flight; they will be redelivered",
                self.requests.inflight,
            )
        elif scope.cancelled_caught:
            log.warning("drain timed out: the broker did not answer within %.0fs", timeout)
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
                    f"{self._status_line()}; {self.requests.handled} requests handled, "
                    f"{self.requests.inflight} in flight"
                )
            if tick % 10 == 0 and self.broker is not None:
                await self._sample_queues(self.broker)
            if self.requests.large_seen:
                self.requests.large_seen = False
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
        self._rare.warn_rarely(key, msg, *args)

    def _redis_fault(self, why: str) -> None:
        """A request met a passing Redis fault: readiness then also needs a write to pass."""
        self._redis_check_writes = True
        self._dependency("redis", False, why)
        self._update_health()

    def _session_of(self, broker: Broker) -> str:
        """The unique name of a broker session (a fresh one if unknown: that republishes)."""
        return self._session_ids.get(broker) or uuid.uuid4().hex

    @property
    def after_decision(self) -> Callable[[Outcome], Awaitable[None]] | None:
        """Test hook: called after a decision is committed in Redis, before anything is
        published."""
        return self.requests.after_decision

    @after_decision.setter
    def after_decision(self, hook: Callable[[Outcome], Awaitable[None]] | None) -> None:
        self.requests.after_decision = hook


def _job_type_of(queue: str) -> str:
    """The job type of an unconfigured type's queue (`jlm.jobs.<job_type>`)."""
    return queue.removeprefix("jlm.jobs.")


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
