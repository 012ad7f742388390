"""The worker's RabbitMQ side: one session with its job queue, confirmed events and re-publishes."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiormq.exceptions import AMQPError, ChannelAccessRefused, ChannelNotFoundEntity
from pamqp.commands import Basic

from jlm import tracing
from jlm.amqp.names import EVENTS, JOBS, JSON
from jlm.amqp.session import AmqpSession, Outgoing
from jlm.config import Settings
from jlm.errors import Unavailable
from jlm.provenance import Event

log = logging.getLogger(__name__)

GEN_HEADER = "x-jlm-gen"


class QueueMissing(Unavailable):
    """The job queue does not exist and this user may not declare it: the daemon declares the
    configured job types' queues at start, so the worker waits for it."""


@dataclass(frozen=True, slots=True)
class Consumed:
    """One job queue the session consumes: its name, job type and prefetch (the concurrency)."""

    queue: str
    job_type: str
    prefetch: int


class WorkerBroker(AmqpSession):
    """One connection: a confirmed publish channel, and a consume channel per job queue whose
    prefetch is that job type's concurrency."""

    def __init__(self, settings: Settings, name: str, consumed: list[Consumed]):
        super().__init__(settings, name)
        self.consumed = consumed
        self.queue_name = ", ".join(c.queue for c in consumed)
        self._consumers: list[tuple[AbstractChannel, AbstractQueue, str | None]] = []

    async def _setup(self, conn: AbstractConnection) -> None:
        self._publish_ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
        for c in self.consumed:
            await self._declare(c)
        for c in self.consumed:
            ch = await conn.channel(publisher_confirms=False)
            await ch.set_qos(prefetch_count=c.prefetch)
            self._consumers.append((ch, await ch.get_queue(c.queue, ensure=False), None))
        self._consume_ch = self._consumers[0][0]

    async def _declare(self, c: Consumed) -> None:
        """Declare exactly as the daemon does (harmless twice); with no configure permission,
        use what the daemon declared."""
        ch = self._publish_ch
        assert ch is not None
        assert self.connection is not None
        try:
            jobs = await ch.declare_exchange(JOBS, aio_pika.ExchangeType.DIRECT, durable=True)
            await ch.declare_exchange(EVENTS, aio_pika.ExchangeType.TOPIC, durable=True)
            q = await ch.declare_queue(c.queue, durable=True, arguments={"x-max-priority": 10})
            await q.bind(jobs, routing_key=c.job_type)
        except ChannelAccessRefused:
            log.info("no configure permission: using the topology the daemon declared")
            ch = self._publish_ch = await self.connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            try:
                await ch.declare_queue(c.queue, passive=True)
            except ChannelNotFoundEntity as exc:
                raise QueueMissing(
                    f"rabbitmq: queue {c.queue} does not exist yet (the daemon declares "
                    "it at start when the job type is configured)",
                    "rabbitmq",
                ) from exc

    async def consume(
        self, callback: Callable[[Consumed, AbstractIncomingMessage], Awaitable[None]]
    ) -> None:
        """Consume every job queue; `callback(c, message)` handles a delivery of `c`'s queue."""
        for i, (ch, queue, _) in enumerate(self._consumers):
            try:
                tag = await queue.consume(partial(callback, self.consumed[i]), no_ack=False)
            except (AMQPError, OSError, RuntimeError) as exc:
                raise Unavailable(f"rabbitmq: consume {queue.name}: {exc}", "rabbitmq") from exc
            self._consumers[i] = (ch, queue, tag)
            # A channel the broker closes (e.g. its queue deleted) loses the session, as the
            # daemon's does: a reconnection consumes every queue again.
            ch.close_callbacks.add(lambda *_: self.closed.set())
        self._consumer_tag = "all"

    async def stop_consuming(self) -> None:
        for i, (ch, queue, tag) in enumerate(self._consumers):
            if tag is None:
                continue
            self._consumers[i] = (ch, queue, None)
            try:
                await queue.cancel(tag)
            except (AMQPError, OSError, RuntimeError) as exc:
                log.debug("cancel consumer: %s", exc)
        self._consumer_tag = None

    async def _publish(self, message: Outgoing) -> None:
        if self.closed.is_set() or self._publish_ch is None:
            raise Unavailable("rabbitmq: session closed", "rabbitmq")
        await self.publish_confirmed([message], set())

    async def publish_event(self, event: Event) -> None:
        """Persistent and confirmed. Not mandatory: before any daemon declared the provenance
        stream nothing is bound to jlm.events, and a worker must not stop for that."""
        await self._publish(Outgoing.event(event, _trace_headers(), mandatory=False))

    async def publish_job(
        self, body: bytes, job_id: str, job_type: str, priority: int, gen: int
    ) -> None:
        """Re-publish a job message for a retry: same id and priority, the next generation."""
        props = Basic.Properties(
            content_type=JSON,
            headers={GEN_HEADER: gen, **_trace_headers()},
            delivery_mode=2,
            priority=priority,
            message_id=job_id,
        )
        await self._publish(Outgoing.of(JOBS, job_type, body, props, True))


def _trace_headers() -> dict[str, Any]:
    """The trace context of the job being handled (its events and retries continue it)."""
    ctx = tracing.current()
    return dict(ctx.headers()) if ctx is not None else {}
