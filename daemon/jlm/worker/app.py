"""The `Worker`: consume a job queue, claim each job, run an async handler, report the outcome.

A handler is `async def handle(job) -> result`. Its return value (JSON-serialisable) becomes the
scope's cached result, an exception fails the job, and a cancellation asked through the daemon
arrives as `asyncio.CancelledError` in the handler's task. docs/worker-protocol.md has the steps,
for workers in other languages too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import AMQPError

from jlm import tracing
from jlm.config import Settings, redact_url
from jlm.errors import Unavailable
from jlm.http_server import HttpServer
from jlm.keys import Keys
from jlm.metrics import HealthState, Metrics
from jlm.provenance import Event
from jlm.retry import RECONNECT_START, STEP_RETRY_START, Backoff, RareLog
from jlm.store import Store
from jlm.worker.broker import Consumed, QueueMissing, WorkerBroker
from jlm.worker.cancels import CancelListener
from jlm.worker.job import (
    Active,
    Handler,
    ReceivedJob,
    claimed_run,
    now,
    parse_job_message,
)
from jlm.worker.registry import App, Route, routes_of, run_hooks
from jlm.worker.runner import (
    Deps,
    JobRunner,
    Settle,
    first_of,
    invalid,
    retry_redis,
    unclaimed,
)
from jlm.worker.store import Facts, WorkerStore, redis_client

log = logging.getLogger(__name__)
# Seconds a job message for a job another run holds may stay unsettled (the contract says 1 s).
SETTLE_WAIT = 0.9


class Worker:
    """Runs `handler` for the jobs of one job type, `concurrency` at a time; or, given an `App`,
    each of its job types with its own handler and concurrency, on one broker connection."""

    def __init__(
        self,
        settings: Settings,
        handler: Handler | App,
        job_type: str | None = None,
        concurrency: int = 1,
        *,
        metrics: Metrics | None = None,
        cancel_grace: float = 1.5,
        stop_grace: float | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.app = handler if isinstance(handler, App) else None
        self.routes = routes_of(settings, handler, job_type, concurrency)
        self.settings = settings
        self.job_type = ", ".join(self.routes)  # its one job type; an app's, for logs and status
        self.concurrency = sum(r.concurrency for r in self.routes.values())
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.metrics = metrics or Metrics(
            max_job_types=settings.file.max_job_types, configured=settings.file.job_types
        )
        self.health = HealthState()
        self._stop_grace = settings.worker_shutdown_timeout if stop_grace is None else stop_grace
        self._keys = Keys(settings.redis_namespace)
        self._store = WorkerStore(
            Store(redis_client(settings, settings.redis_cluster), self._keys, self.metrics),
            settings.file.job_ttl,
            settings.file.terminal_ttl,
            settings.file.max_history_jobs,
        )
        self._http: HttpServer | None = None
        if settings.worker_metrics_addr:
            host, _, port = settings.worker_metrics_addr.rpartition(":")
            self._http = HttpServer(self.metrics, self.health, host.strip("[]"), int(port))
        self._broker: WorkerBroker | None = None
        self._stopping = asyncio.Event()
        self._give_up = asyncio.Event()
        self.started = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._active: dict[str, Active] = {}
        self._abandoned: set[asyncio.Task[Any]] = set()
        self._rare = RareLog(log)
        self._deps = Deps(
            settings=settings,
            store=self._store,
            metrics=self.metrics,
            emit=self._emit,
            republish=self._republish,
            abandon=self._abandon,
            warn=self._warn_rarely,
            stopping=self._stopping,
            give_up=self._give_up,
            lease_ms=max(int(settings.lease_seconds * 1000), 300),
            cancel_grace=cancel_grace,
            worker_id=self.id,
        )
        self._cancels = CancelListener(self._deps, self._keys, self.health, self._active)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def running(self) -> list[str]:
        """The ids of the jobs running here."""
        return list(self._active)

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    # -- lifespan --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until `stop()`, then drain. Raises Unavailable when Redis or the broker cannot
        be reached at start."""
        broker = self._new_broker()
        hooked: App | None = None  # set once the start-up hooks ran: the shutdown hooks run too
        try:
            await self._store.store.ping_script()
            if self.app is not None:
                hooked = self.app
                await run_hooks(hooked, hooked.startup)
            if self._http is not None:
                await self._http.start()  # /readyz answers 503 while the queue is awaited
            broker = await self._open_when_queue_exists(broker)
            self.health.set("redis", True)
            listener = asyncio.create_task(self._cancels.run(), name="jlm cancel listener")
            try:
                if not self._stopping.is_set():
                    await self._sessions(broker)
                await self._drain()
            finally:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)
        finally:
            self._give_up.set()
            await broker.close()
            if self._broker is not None:
                await self._broker.close()
            for task in self._abandoned:
                task.cancel()
            if self._http is not None:
                await self._http.stop()
            await self._store.store.close()
            if hooked is not None:
                await run_hooks(hooked, hooked.shutdown[::-1])
            log.info("worker %s stopped", self.id)

    def stop(self, *, force: bool = False) -> None:
        """Stop consuming and drain; `force` stops running handlers without their grace."""
        self._stopping.set()
        if force:
            self._stop_grace = 0
            for active in self._active.values():
                active.interrupt("stopping")

    async def _open_when_queue_exists(self, broker: WorkerBroker) -> WorkerBroker:
        """Open the first session; while the job queue does not exist (a broker user without
        configure permission, started before the daemon), wait for it instead of exiting."""
        backoff = Backoff(RECONNECT_START, self.settings.retry_max_delay)
        while True:
            try:
                await broker.open()
                return broker
            except QueueMissing as exc:
                self.health.set("queue", False)
                self._warn_rarely("queue", "waiting: %s", exc.message)
            await first_of(self._stopping.wait(), asyncio.sleep(backoff.next()))
            if self._stopping.is_set():
                return broker
            broker = self._new_broker()

    def _new_broker(self) -> WorkerBroker:
        name = f"jlm worker {self.id}"
        consumed = [
            Consumed(r.queue or "", r.job_type, r.concurrency) for r in self.routes.values()
        ]
        return WorkerBroker(self.settings, name, consumed)

    async def _sessions(self, broker: WorkerBroker) -> None:
        """One AMQP session after another until stopping; running handlers outlive a session."""
        backoff = Backoff(RECONNECT_START, self.settings.retry_max_delay)
        while True:
            self._broker = broker
            try:
                await broker.consume(functools.partial(self._on_message, broker))
            except Unavailable as exc:
                log.warning("cannot consume %s: %s", broker.queue_name, exc.message)
                broker.closed.set()
            else:
                self._set_consuming(True)
                self.started.set()
                log.info(
                    "worker %s consuming %s (prefetch %s)",
                    self.id,
                    broker.queue_name,
                    ", ".join(str(r.concurrency) for r in self.routes.values()),
                )
                await first_of(self._stopping.wait(), broker.closed.wait())
            self._set_consuming(False)
            if self._stopping.is_set():
                await broker.stop_consuming()
                return
            log.warning("broker connection lost; reconnecting (unacked jobs are redelivered)")
            await broker.close()
            while True:
                broker = self._new_broker()
                try:
                    await broker.open()
                    break
                except Unavailable as exc:
                    self._warn_rarely("rabbitmq", "waiting for rabbitmq: %s", exc.message)
                    await first_of(self._stopping.wait(), asyncio.sleep(backoff.next()))
                    if self._stopping.is_set():
                        return
            backoff.reset()

    def _set_consuming(self, up: bool) -> None:
        if up:
            self.health.checks.pop("queue", None)
        self.health.set("rabbitmq", up)
        self.health.set("consuming", up)

    async def _drain(self) -> None:
        """Running handlers get the grace period, then are cancelled and their jobs released."""
        log.info(
            "stopping: %d jobs running, up to %gs to finish", len(self._active), self._stop_grace
        )
        if self._tasks and self._stop_grace > 0:
            await asyncio.wait(set(self._tasks), timeout=self._stop_grace)
        for active in self._active.values():
            active.interrupt("stopping")
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self._deps.cancel_grace + 10)
        if self._tasks:
            log.warning("%d job messages unsettled at exit: they are redelivered", len(self._tasks))

    # -- one delivery ----------------------------------------------------------------------------

    async def _on_message(
        self, broker: WorkerBroker, consumed: Consumed, message: AbstractIncomingMessage
    ) -> None:
        # Our own task, not the AMQP library's: a handler must outlive a broken channel.
        route = self.routes[consumed.job_type]
        task = asyncio.create_task(self._process(broker, route, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _process(
        self, broker: WorkerBroker, route: Route, message: AbstractIncomingMessage
    ) -> None:
        later: list[Awaitable[None]] = []
        try:
            settle = await self._deliver(broker, route, message, later)
        except Exception:
            log.exception("internal error on job message %s", message.message_id)
            await asyncio.sleep(1)
            settle = "requeue"
        if settle != "keep":
            await _settle(message, requeue=settle == "requeue")
        for step in later:
            try:
                await step
            except Exception:
                log.exception("publishing after job message %s", message.message_id)

    async def _deliver(
        self,
        broker: WorkerBroker,
        route: Route,
        message: AbstractIncomingMessage,
        later: list[Awaitable[None]],
    ) -> Settle:
        """Claim and run; `later` gets what is published once the message is settled."""
        # This task (and the handler's) continues the job's trace: its logs and events carry it.
        tracing.adopt(tracing.from_headers(message.headers))
        msg = parse_job_message(message.body)
        if msg is None:
            later.append(self._emit(invalid(self._deps, route.job_type, message.message_id)))
            return "ack"
        facts = await self._claim(broker, msg, bool(message.redelivered))
        if facts is None:
            return "keep" if broker.closed.is_set() else "requeue"
        if facts.o == "claimed":
            return await self._execute(route, msg, facts, later)
        if facts.o == "wait":
            # A second copy of a job another run holds (e.g. a replay): that run owns the job.
            # Should its worker die, its own message comes back (redelivered) and recovers it.
            label = self.metrics.job_type_label(msg.job_type)
            self.metrics.jobs_skipped.labels(job_type=label, reason="running").inc()
            return "ack"
        later.append(self._emit(unclaimed(self._deps, msg, facts)))
        return "ack"

    async def _claim(
        self, broker: WorkerBroker, msg: ReceivedJob, redelivered: bool
    ) -> Facts | None:
        """Claim, within SETTLE_WAIT seconds. None: give the message back.

        While another run holds a live lease the answer is `wait`. A first delivery is a second
        copy of the job's message (the holder has its own): `wait` is returned, to ack. A
        redelivered message may be the holder's own, back because its worker died: it is
        claimed again until SETTLE_WAIT, then given back to the queue (requeued, not held), so
        the job is recovered by whichever worker gets it once the dead worker's lease lapses.
        """
        # The worker's own setting when its configuration names the job type, else the job's.
        jt = self.settings.file.job_types.get(msg.job_type)
        max_attempts = jt.max_attempts if jt is not None else ""
        deadline = time.monotonic() + SETTLE_WAIT
        while not self._stopping.is_set() and not broker.closed.is_set():
            facts = await retry_redis(
                self._deps,
                lambda: self._store.claim(
                    msg.job_id,
                    self.id,
                    now(),
                    lease_ms=self._deps.lease_ms,
                    max_attempts=max_attempts,
                ),
            )
            if facts is None or facts.o != "wait" or not redelivered:
                return facts
            # Perhaps a dead worker's message: look again when its lease would expire (a live
            # worker keeps renewing it), at most until SETTLE_WAIT, then requeue.
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            wait = min(float(facts.get("wait_ms", 1000)) / 1000 + 0.05, left)
            await first_of(self._stopping.wait(), broker.closed.wait(), asyncio.sleep(wait))
        return None

    async def _execute(
        self, route: Route, msg: ReceivedJob, facts: Facts, later: list[Awaitable[None]]
    ) -> Settle:
        trace = tracing.current()  # adopted from the job message's headers
        traceparent = trace.traceparent if trace is not None else None
        active, event = claimed_run(self.id, msg, facts, traceparent=traceparent)
        job = active.job
        self._active[job.id] = active
        if self._cancels.cancelled(job.id):  # the notice overtook the claim's reply
            active.interrupt("cancelled")
        label = self.metrics.job_type_label(job.job_type)
        self.metrics.jobs_claimed.labels(job_type=label).inc()
        if facts.get("recovered"):
            self.metrics.jobs_recovered.labels(job_type=label, outcome="retried").inc()
        # Published while the handler starts; awaited before the run's outcome is published.
        claimed = asyncio.create_task(self._emit(event))
        later.append(claimed)
        log.debug("claimed job %s (attempt %d)", job.id, job.attempt, extra={"job_id": job.id})
        try:
            return await JobRunner(
                self._deps, active, msg, claimed, later, route=route, claimed_facts=facts
            ).run()
        finally:
            self._active.pop(job.id, None)

    def _abandon(self, task: asyncio.Task[Any], job_id: str) -> None:
        self._abandoned.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._abandoned.discard(t)
            if not t.cancelled():
                t.exception()
            log.info("the abandoned handler of job %s has ended", job_id, extra={"job_id": job_id})

        task.add_done_callback(done)

    # -- publishing ------------------------------------------------------------------------------

    async def _publish(self, action: Callable[[WorkerBroker], Awaitable[None]], what: str) -> bool:
        """Publish on the current session, waiting out a reconnection; False if given up at exit."""
        backoff = Backoff(STEP_RETRY_START, self.settings.retry_max_delay)
        while True:
            broker = self._broker
            try:
                if broker is None:
                    raise Unavailable("rabbitmq: not connected", "rabbitmq")
                await action(broker)
                return True
            except Unavailable as exc:
                if self._give_up.is_set():
                    log.error("%s not published: %s", what, exc.message)
                    return False
                self._warn_rarely("publish", "waiting to publish: %s", exc.message)
            await first_of(self._give_up.wait(), asyncio.sleep(backoff.next()))

    async def _emit(self, event: Event) -> None:
        await self._publish(lambda b: b.publish_event(event), f"event {event.type}")

    async def _republish(self, msg: ReceivedJob, gen: int) -> bool:
        return await self._publish(
            lambda b: b.publish_job(msg.raw, msg.job_id, msg.job_type, msg.priority, gen),
            f"job message {msg.job_id}",
        )

    def _warn_rarely(self, key: str, text: str, arg: str) -> None:
        self._rare.warn_rarely(key, text, redact_url(arg)[:300])


async def _settle(message: AbstractIncomingMessage, *, requeue: bool = False) -> None:
    """Ack, or nack with requeue, on the delivery's own channel; a dead channel means the broker
    redelivers the message, and the next claim sees what this one did."""
    try:
        if requeue:
            await message.nack(requeue=True)
        else:
            await message.ack()
    except (AMQPError, OSError, RuntimeError) as exc:
        log.info("settling job message %s: channel gone (%s)", message.message_id, exc)
