"""The daemon's RabbitMQ side: its topology, decision publishing, dead letters and replies, on an
AMQP session (`jlm.amqp.session`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
)
from aiormq.exceptions import (
    AMQPError,
    ChannelAccessRefused,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
)
from pamqp import encode as amqp_encode

from jlm.amqp import lean
from jlm.amqp.connect import why
from jlm.amqp.lean import Incoming
from jlm.amqp.names import DEAD, EVENTS, JOBS, JSON, PROVENANCE, REQUESTS
from jlm.amqp.session import AmqpSession, Callback, Outgoing, failure_ends_it, raw_channel
from jlm.config import Settings
from jlm.errors import QueueRefused, Unavailable, bounded
from jlm.metrics import Metrics
from jlm.protocol import JobMessage
from jlm.provenance import Event

log = logging.getLogger(__name__)


def request_queue_arguments(settings: Settings) -> dict[str, Any]:
    args: dict[str, Any] = {"x-dead-letter-exchange": DEAD}
    if settings.requests_queue_type == "quorum":
        args["x-queue-type"] = "quorum"
        args["x-delivery-limit"] = settings.requests_delivery_limit
    return args


class Broker(AmqpSession):
    """One AMQP session: consume channel, confirmed publish channel, reply channel."""

    lean_consume = True  # every request is settled by `ack`

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        super().__init__(settings, "jlm daemon")
        self._metrics = metrics
        self._reply_ch: AbstractChannel | None = None
        self._lean_reply: lean.LeanChannel | None = None
        self._jobs: AbstractExchange | None = None
        self._events: AbstractExchange | None = None
        self._dead: AbstractExchange | None = None
        self._declared: set[str] = set()
        self._declare_lock = asyncio.Lock()

    async def _setup(self, conn: AbstractConnection) -> None:
        self._consume_ch = await conn.channel(publisher_confirms=False)
        await self._consume_ch.set_qos(prefetch_count=self._settings.prefetch)
        self._publish_ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
        self._reply_ch = await conn.channel(publisher_confirms=False)
        # A channel the broker closed (e.g. a publish to a deleted exchange) is never reopened:
        # it ends the session, and the next one declares the topology again.
        for ch in (self._consume_ch, self._publish_ch, self._reply_ch):
            ch.close_callbacks.add(lambda *_: self.closed.set())
        self._lean_reply = await self.lean_channel(self._reply_ch)
        await self.declare_topology()
        await self._declare_configured_job_queues()

    async def _declare_configured_job_queues(self) -> None:
        """The queue of every configured job type, at start: a worker whose broker user may not
        declare queues finds its queue before the first request of its type."""
        file = self._settings.file
        for job_type in sorted(file.job_types):
            try:
                await self.ensure_job_queue(file.queue_for(job_type), job_type)
            except Unavailable as exc:
                # Declared again with the first job of the type; a conflicting queue must not
                # keep the daemon from serving every other type.
                log.warning("job queue of %s not declared at start: %s", job_type, exc.message)

    async def declare_topology(self) -> None:
        """Idempotent declarations of every fixed name of the contract."""
        ch = self._publish_ch
        assert ch is not None
        assert self._consume_ch is not None
        s = self._settings
        durable = True
        requests_x = await ch.declare_exchange(
            REQUESTS, aio_pika.ExchangeType.TOPIC, durable=durable
        )
        self._jobs = await ch.declare_exchange(JOBS, aio_pika.ExchangeType.DIRECT, durable=durable)
        self._events = await ch.declare_exchange(
            EVENTS, aio_pika.ExchangeType.TOPIC, durable=durable
        )
        self._dead = await ch.declare_exchange(DEAD, aio_pika.ExchangeType.FANOUT, durable=durable)
        await self._declare_dead_queue(self._conn())
        prov = await ch.declare_queue(
            PROVENANCE,
            durable=durable,
            arguments={
                "x-queue-type": "stream",
                "x-max-age": s.provenance_max_age,
                "x-max-length-bytes": s.provenance_max_bytes,
            },
        )
        await prov.bind(self._events, routing_key="#")
        self._consume_queue = await self._consume_ch.declare_queue(
            REQUESTS,
            durable=durable,
            arguments=request_queue_arguments(s),
        )
        await self._consume_queue.bind(requests_x, routing_key="#")

    async def _declare_dead_queue(self, conn: AbstractConnection) -> None:
        """jlm.dead, bounded in bytes (oldest dropped first), bound to the jlm.dead exchange.

        A jlm.dead declared by an older version has no length arguments, and the broker refuses
        a declaration that adds them (PRECONDITION_FAILED, which closes the channel): the
        existing queue is then used as it is, and the warning names the policy that bounds it
        (docs/operations.md, "Upgrading: a bounded jlm.dead").
        """
        assert self._dead is not None
        limit = self._settings.file.dead_letter_max_length_bytes
        arguments: dict[str, Any] = {"x-max-length-bytes": limit, "x-overflow": "drop-head"}
        try:
            async with conn.channel() as ch:
                await ch.declare_queue(DEAD, durable=True, arguments=arguments)
        except ChannelPreconditionFailed:
            log.warning(
                "%s exists without a length bound; bound it with a policy: rabbitmqctl "
                "set_policy -p <vhost> --apply-to queues jlm-dead '^jlm\\.dead$' "
                '\'{"max-length-bytes": %d, "overflow": "drop-head"}\'',
                DEAD,
                limit,
            )
        assert self._publish_ch is not None
        dead_q = await self._publish_ch.declare_queue(DEAD, passive=True)
        await dead_q.bind(self._dead, routing_key="")

    def _conn(self) -> AbstractConnection:
        assert self.connection is not None
        return self.connection

    async def ensure_job_queue(self, queue: str, job_type: str) -> None:
        """Declare a job queue (priority 1..10) and its binding once per session."""
        if queue in self._declared:
            return
        async with self._declare_lock:
            if queue in self._declared:
                return
            assert self.connection is not None
            assert self._jobs is not None
            try:
                # On a channel of its own: a queue declared elsewhere with other arguments fails
                # the declaration (PRECONDITION_FAILED) and closes only this channel.
                async with self.connection.channel() as ch:
                    q = await ch.declare_queue(
                        queue,
                        durable=True,
                        arguments={"x-max-priority": 10},
                    )
                    await q.bind(self._jobs, routing_key=job_type)
            except (ChannelPreconditionFailed, ChannelAccessRefused) as exc:
                # The broker answered, and will answer the same again: a vhost queue limit, a
                # permission, a queue of that name with other arguments.
                raise QueueRefused(f"rabbitmq refused to declare {queue}: {why(exc)}") from exc
            except (AMQPError, OSError) as exc:
                raise Unavailable(f"rabbitmq: declaring {queue}: {why(exc)}", "rabbitmq") from exc
            self._declared.add(queue)

    @property
    def job_queues(self) -> frozenset[str]:
        """The job queues this session has declared (bounded by the job types in use)."""
        return frozenset(self._declared)

    async def consume(self, callback: Callback, prefetch: int | None = None) -> None:
        """Consume jlm.requests; `prefetch` replaces the setting for this and later consumers."""
        assert self._consume_ch is not None
        try:
            if prefetch is not None:
                await self._consume_ch.set_qos(prefetch_count=prefetch)
            await self._start_consuming(callback)
        except (Unavailable, AMQPError, OSError, RuntimeError) as exc:
            log.warning("cannot consume %s: %s", REQUESTS, why(exc))
            self.closed.set()  # the session is over: the service opens another

    def _returned(self) -> None:
        # Forget the declarations, so that the retry declares the job queue again (it may have
        # been deleted).
        self._declared.clear()

    async def publish_decision(
        self,
        job: JobMessage | None,
        queue: str | None,
        events: list[Event],
        done: set[str] | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Publish a decision's job message and events; return once the broker confirmed all.

        The job before its events: no event says "enqueued" until the broker has the job, and a
        refused or unroutable job is retried without its events. `done` holds the message ids
        an earlier attempt of the same decision got confirmed; they are not sent again.
        `headers` (the request's trace context) go on every message.
        """
        headers = headers or {}
        started = time.perf_counter()
        done = set() if done is None else done
        if job is not None:
            assert queue is not None
            try:
                await self.ensure_job_queue(queue, job.job_type)
            except QueueRefused as exc:
                # Declared before the decision; refused now (deleted since, and over a limit):
                # the decision is recorded, so its job waits for the queue, retried.
                raise Unavailable(exc.message, "rabbitmq") from exc
            await self.publish_confirmed([Outgoing.job(job, dict(headers))], done)
        messages = [Outgoing.event(event, dict(headers)) for event in events]
        await self.publish_confirmed(messages, done)
        self._metrics.publish_confirm_duration.observe(time.perf_counter() - started)

    async def publish_jobs(
        self, jobs: list[tuple[JobMessage, str]], events: list[Event], done: set[str]
    ) -> None:
        """Publish scheduled jobs (message, queue) at once, then the events of those confirmed.

        `done` gets the id of each message the broker confirmed; the first failure is raised once
        every confirm is in. An event goes out only once its job (same `job_id`) is confirmed."""
        for queue, job_type in {(q, j.job_type) for j, q in jobs}:
            try:
                await self.ensure_job_queue(queue, job_type)
            except QueueRefused as exc:
                raise Unavailable(exc.message, "rabbitmq") from exc
        out = [Outgoing.job(job, {}) for job, _ in jobs]
        failure: Exception | None = None
        try:
            await self.publish_confirmed(out, done)
        except Unavailable as exc:
            failure = exc
        messages = [Outgoing.event(e, {}) for e in events if e.job_id in done]
        await self.publish_confirmed(messages, done)
        if failure is not None:
            raise failure

    async def dead_letter(self, message: Incoming, code: str, reason: str) -> None:
        """Copy a rejected request to jlm.dead with the reason in its headers.

        The body is kept whole up to `dead_letter_max_bytes`; a longer one is cut there and the
        copy says so (`x-jlm-truncated: true`, `x-jlm-original-bytes`).
        """
        assert self._dead is not None
        keep = self._settings.file.dead_letter_max_bytes
        body = message.body
        headers = dict(message.headers or {})
        try:
            amqp_encode.field_table(headers)
        except (TypeError, ValueError, OverflowError, struct.error):
            # Headers another client may send but pamqp cannot write back (e.g. a double beyond
            # float32 range): kept as text, or the dead letter would fail on every delivery.
            headers = {"x-jlm-original-headers": repr(headers)[:4000]}
        headers.update(
            {
                "x-jlm-error": code,
                "x-jlm-error-message": bounded(reason),
                "x-jlm-operation": (message.routing_key or "")[:255],
                "x-jlm-rejected-at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        if len(body) > keep:
            headers["x-jlm-truncated"] = True
            headers["x-jlm-original-bytes"] = len(body)
            body = body[:keep]
        msg = aio_pika.Message(
            body,
            headers=headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            type=message.type,
        )
        dead = Outgoing.of(DEAD, message.routing_key or "", msg.body, msg.properties, False)
        await self.publish_confirmed([dead], set())

    async def reply(
        self,
        reply_to: str,
        correlation_id: str | None,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer on the default exchange (with the request's trace `headers`); a caller that
        went away is not an error."""
        if reply_to.startswith("jlm."):
            # The default exchange reaches every queue of the vhost: a caller must not aim the
            # daemon's replies at its own queues (jobs, requests, dead letters, provenance).
            log.warning("reply_to %r names a jlm.* queue: reply not sent", reply_to[:100])
            return
        assert self._reply_ch is not None
        body_bytes = orjson.dumps(body)
        try:
            # ValueError: a correlation id that does not fit an AMQP short string.
            props = lean.properties(
                content_type=JSON, headers=dict(headers or {}), delivery_mode=1, priority=0,
                correlation_id=correlation_id,
            )  # fmt: skip
            # Written behind nothing but earlier frames: the ack that follows leaves after it.
            if self._lean_reply is not None:
                self._lean_reply.publish("", reply_to, body_bytes, props)
            else:
                channel = await raw_channel(self._reply_ch)
                await channel.basic_publish(
                    body_bytes, routing_key=reply_to, properties=lean.decoded(props), wait=False
                )
        except (AMQPError, OSError, RuntimeError, ValueError) as exc:
            log.warning("reply to %s not sent: %s", reply_to[:100], why(exc))

    async def queue_depths(self, names: list[str]) -> dict[str, int]:
        """Messages ready in each queue that exists, by passive declares on one channel.

        A missing queue closes the channel (404); only then is another one opened.
        """
        depths: dict[str, int] = {}
        if self.connection is None or self.closed.is_set():
            return depths
        ch: AbstractChannel | None = None
        try:
            with failure_ends_it("queue depths"):
                for name in names:
                    if ch is None or ch.is_closed:
                        ch = await self.connection.channel()
                    try:
                        q = await ch.declare_queue(name, passive=True)
                    except ChannelNotFoundEntity:
                        continue
                    depths[name] = q.declaration_result.message_count or 0
        finally:
            if ch is not None and not ch.is_closed:
                with contextlib.suppress(AMQPError, OSError, RuntimeError):
                    await ch.close()
        return depths

    async def probe(self, timeout: float) -> None:
        """End the session if the broker does not answer a round trip within `timeout`.

        A reset connection fails at once, but a silent one (a stalled path) is noticed by aiormq
        only after 3 x (heartbeat + 1) s. Basic.Qos on the reply channel, which has no consumer,
        is a round trip with no effect.
        """
        if self._reply_ch is None or self.closed.is_set():
            return
        # A failed connection reports itself through its close callback.
        with failure_ends_it("probe"):
            try:
                async with asyncio.timeout(timeout):
                    await self._reply_ch.set_qos(prefetch_count=0)
            except TimeoutError:
                log.warning("no answer from the broker in %.0fs: connection stalled", timeout)
                self.closed.set()
