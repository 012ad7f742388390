"""The RabbitMQ side: connection with fail-over, topology, the confirmed publisher, the consumer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import aio_pika
import aiormq
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiormq.exceptions import (
    AMQPError,
    ChannelAccessRefused,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
    PublishError,
)
from pamqp import encode as amqp_encode
from pamqp.commands import Basic

from jlm.config import Settings
from jlm.connect import DEAD, EVENTS, JOBS, PROVENANCE, REQUESTS, connect_first, why
from jlm.errors import QueueRefused, Unavailable, bounded
from jlm.metrics import Metrics
from jlm.protocol import JobMessage
from jlm.provenance import Event

# The names the broker's users know it by (some now live in jlm.connect), and its own.
__all__ = [
    "CONFIRM_TIMEOUT",
    "DEAD",
    "EVENTS",
    "JOBS",
    "JSON",
    "PROVENANCE",
    "REQUESTS",
    "AmqpSession",
    "Broker",
    "Callback",
    "Outgoing",
    "connect_first",
    "request_queue_arguments",
    "why",
]

log = logging.getLogger(__name__)

JSON = "application/json"
# Longest wait for a publisher confirm; a persistent message is normally confirmed in ms.
CONFIRM_TIMEOUT = 30.0

Callback = Callable[[AbstractIncomingMessage], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish with a confirm."""

    exchange: str
    routing_key: str
    body: bytes
    properties: Basic.Properties
    mandatory: bool

    @property
    def message_id(self) -> str:
        return self.properties.message_id or ""


async def _raw(channel: AbstractChannel | None) -> aiormq.Channel:
    """The aiormq channel under an aio-pika one (its publish can skip waiting for the socket)."""
    assert channel is not None
    return cast(aiormq.Channel, await channel.get_underlay_channel())


def _cancelled_here() -> bool:
    """Whether this task itself is being cancelled.

    aiormq fails the pending calls of a connection it found stuck with a CancelledError that is
    not addressed to the caller; only a real cancellation of the caller may propagate.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def request_queue_arguments(settings: Settings) -> dict[str, Any]:
    args: dict[str, Any] = {"x-dead-letter-exchange": DEAD}
    if settings.requests_queue_type == "quorum":
        args["x-queue-type"] = "quorum"
        args["x-delivery-limit"] = settings.requests_delivery_limit
    return args


class AmqpSession:
    """One AMQP connection with a consumer and a confirmed publish channel; the daemon's `Broker`
    and the worker's `WorkerBroker` are two kinds of it."""

    def __init__(self, settings: Settings, name: str) -> None:
        self._settings = settings
        self._name = name  # the connection name the broker shows
        self.connection: AbstractConnection | None = None
        self._consume_ch: AbstractChannel | None = None
        self._publish_ch: AbstractChannel | None = None
        self._consume_queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self.closed = asyncio.Event()

    async def open(self) -> None:
        """Connect to the first node that answers and set the session up; Unavailable if not."""
        conn = await connect_first(self._settings, self._name)
        self.connection = conn
        conn.close_callbacks.add(lambda *_: self.closed.set())
        try:
            await self._setup(conn)
        except Unavailable:
            await self.close()
            raise
        except (AMQPError, OSError, RuntimeError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and _cancelled_here():
                raise
            await self.close()
            raise Unavailable(f"rabbitmq: {type(exc).__name__}: {why(exc)}", "rabbitmq") from exc

    async def _setup(self, conn: AbstractConnection) -> None:
        """Open the channels and declare (or look up) what the session uses."""
        raise NotImplementedError

    async def _start_consuming(self, callback: Callback) -> None:
        assert self._consume_queue is not None
        try:
            self._consumer_tag = await self._consume_queue.consume(callback, no_ack=False)
        except (AMQPError, OSError, RuntimeError) as exc:
            raise Unavailable(f"rabbitmq: consume: {why(exc)}", "rabbitmq") from exc

    async def stop_consuming(self) -> None:
        if self._consume_queue is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            try:
                await self._consume_queue.cancel(tag)
            except (AMQPError, OSError, RuntimeError) as exc:
                log.debug("cancel consumer: %s", exc)

    @property
    def consuming(self) -> bool:
        return (
            self._consumer_tag is not None
            and self._consume_ch is not None
            and not self._consume_ch.is_closed
            and not self.closed.is_set()
        )

    def _returned(self) -> None:
        """A mandatory message came back unroutable (the daemon forgets its declarations)."""

    async def _confirmed(
        self,
        exchange: str,
        body: bytes,
        properties: Basic.Properties,
        routing_key: str,
        mandatory: bool,
    ) -> None:
        """Publish one message and wait for its confirm (callers bound the wait)."""
        try:
            # aiormq directly, without waiting for the frame to reach the socket (`wait=False`):
            # the confirm is what we wait for. Measured: see bench/RESULTS.md.
            channel = await _raw(self._publish_ch)
            confirm = await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
                wait=False,
            )
        except PublishError as exc:
            # Returned: nothing is bound for it (e.g. the job queue was deleted).
            self._returned()
            raise Unavailable(
                f"rabbitmq: unroutable message to {exchange}/{routing_key}",
                "rabbitmq",
            ) from exc
        except (DeliveryError, AMQPError, OSError, RuntimeError) as exc:
            raise Unavailable(f"rabbitmq: publish failed: {why(exc)}", "rabbitmq") from exc
        if not isinstance(confirm, Basic.Ack):
            raise Unavailable(
                f"rabbitmq: broker refused a message to {exchange}/{routing_key}",
                "rabbitmq",
            )

    async def publish_confirmed(self, messages: list[Outgoing], done: set[str]) -> None:
        """Publish the messages not in `done` at once; add each confirmed one's id to `done`.

        Raises the first failure once every confirm is in, so that a retry publishes only what
        the broker has not confirmed.
        """
        todo = [m for m in messages if m.message_id not in done]
        if not todo:
            return
        try:
            async with asyncio.timeout(CONFIRM_TIMEOUT):
                if len(todo) == 1:
                    results: list[BaseException | None] = [await self._confirm_one(todo[0])]
                else:
                    results = await asyncio.gather(*(self._confirm_one(m) for m in todo))
        except TimeoutError as exc:
            # RabbitMQ 3.10 can lose the confirm of a message sent to a stream (or replicated
            # queue) whose leader node just died (tests/cluster). The channel is not trusted
            # again: the session ends, and its unacked requests are redelivered and replayed.
            log.warning("no confirm from the broker in %.0fs: ending the session", CONFIRM_TIMEOUT)
            self.closed.set()
            raise Unavailable("rabbitmq: no confirm from the broker", "rabbitmq") from exc
        failure: BaseException | None = None
        for message, result in zip(todo, results, strict=True):
            if result is None:
                done.add(message.message_id)
            elif failure is None:
                failure = result
        if failure is not None:
            raise failure

    async def _confirm_one(self, m: Outgoing) -> BaseException | None:
        try:
            await self._confirmed(m.exchange, m.body, m.properties, m.routing_key, m.mandatory)
        except Unavailable as exc:
            return exc
        return None

    @staticmethod
    async def ack(message: AbstractIncomingMessage) -> None:
        """Ack a delivery on its own channel, without waiting for the frame to reach the socket.

        The ack follows the reply's frames on the connection. Lost with the connection, the
        request is redelivered and its recorded decision replayed.
        """
        assert message.delivery_tag is not None
        await message.channel.basic_ack(message.delivery_tag, wait=False)

    async def close(self) -> None:
        if self.connection is not None and not self.connection.is_closed:
            try:
                await self.connection.close()
            except (AMQPError, OSError, RuntimeError) as exc:
                log.debug("close: %s", exc)
        self.closed.set()


class Broker(AmqpSession):
    """One AMQP session: consume channel, confirmed publish channel, reply channel."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        super().__init__(settings, "jlm daemon")
        self._metrics = metrics
        self._reply_ch: AbstractChannel | None = None
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
    ) -> None:
        """Publish a decision's job message and events; return once the broker confirmed all.

        The job before its events: no event says "enqueued" until the broker has the job, and a
        refused or unroutable job is retried without its events. `done` holds the message ids
        an earlier attempt of the same decision got confirmed; they are not sent again.
        """
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
            # The same properties aio_pika.Message would build, without its per-message cost.
            props = Basic.Properties(
                content_type=JSON,
                headers={},
                delivery_mode=2,
                priority=job.priority,
                message_id=job.job_id,
            )
            job_out = Outgoing(JOBS, job.job_type, orjson.dumps(job.body()), props, True)
            await self.publish_confirmed([job_out], done)
        messages: list[Outgoing] = []
        for event in events:
            props = Basic.Properties(
                content_type=JSON,
                headers={},
                delivery_mode=2,
                priority=0,
                message_id=event.provenance_id,
                message_type=event.type,
            )
            messages.append(Outgoing(EVENTS, event.type, orjson.dumps(event.body()), props, True))
        await self.publish_confirmed(messages, done)
        self._metrics.publish_confirm_duration.observe(time.perf_counter() - started)

    async def dead_letter(self, message: AbstractIncomingMessage, code: str, reason: str) -> None:
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
        dead = Outgoing(DEAD, message.routing_key or "", msg.body, msg.properties, False)
        await self.publish_confirmed([dead], set())

    async def reply(self, reply_to: str, correlation_id: str | None, body: dict[str, Any]) -> None:
        """Answer on the default exchange; a caller that went away is not an error."""
        if reply_to.startswith("jlm."):
            # The default exchange reaches every queue of the vhost: a caller must not aim the
            # daemon's replies at its own queues (jobs, requests, dead letters, provenance).
            log.warning("reply_to %r names a jlm.* queue: reply not sent", reply_to[:100])
            return
        assert self._reply_ch is not None
        props = Basic.Properties(
            content_type=JSON,
            headers={},
            delivery_mode=1,
            priority=0,
            correlation_id=correlation_id,
        )
        try:
            # Queued behind nothing but earlier frames: the ack that follows leaves after it.
            channel = await _raw(self._reply_ch)
            await channel.basic_publish(
                orjson.dumps(body), routing_key=reply_to, properties=props, wait=False
            )
        except (AMQPError, OSError, RuntimeError) as exc:
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
            for name in names:
                if ch is None or ch.is_closed:
                    ch = await self.connection.channel()
                try:
                    q = await ch.declare_queue(name, passive=True)
                except ChannelNotFoundEntity:
                    continue
                depths[name] = q.declaration_result.message_count or 0
        except (AMQPError, OSError, RuntimeError):
            pass
        except asyncio.CancelledError:
            if _cancelled_here():
                raise
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
        try:
            async with asyncio.timeout(timeout):
                await self._reply_ch.set_qos(prefetch_count=0)
        except TimeoutError:
            log.warning("no answer from the broker in %.0fs: connection stalled", timeout)
            self.closed.set()
        except (AMQPError, OSError, RuntimeError):
            pass  # a failed connection reports itself through its close callback
        except asyncio.CancelledError:
            if _cancelled_here():
                raise
