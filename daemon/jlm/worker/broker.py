"""The worker's RabbitMQ side: one session with its job queue, confirmed events and re-publishes."""

from __future__ import annotations

import logging
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection
from aiormq.exceptions import ChannelAccessRefused, ChannelNotFoundEntity
from pamqp.commands import Basic

from jlm import tracing
from jlm.amqp.names import EVENTS, JOBS, JSON
from jlm.amqp.session import AmqpSession, Callback, Outgoing
from jlm.config import Settings
from jlm.errors import Unavailable
from jlm.provenance import Event

log = logging.getLogger(__name__)

GEN_HEADER = "x-jlm-gen"


class QueueMissing(Unavailable):
    """The job queue does not exist and this user may not declare it: the daemon declares the
    configured job types' queues at start, so the worker waits for it."""


class WorkerBroker(AmqpSession):
    """Consume channel (prefetch = concurrency) and confirmed publish channel of one connection."""

    def __init__(self, settings: Settings, name: str, queue: str, job_type: str, prefetch: int):
        super().__init__(settings, name)
        self.queue_name = queue
        self._job_type = job_type
        self._prefetch = prefetch

    async def _setup(self, conn: AbstractConnection) -> None:
        self._publish_ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
        await self._declare()
        self._consume_ch = await conn.channel(publisher_confirms=False)
        await self._consume_ch.set_qos(prefetch_count=self._prefetch)
        self._consume_queue = await self._consume_ch.get_queue(self.queue_name, ensure=False)

    async def _declare(self) -> None:
        """Declare exactly as the daemon does (harmless twice); with no configure permission,
        use what the daemon declared."""
        ch = self._publish_ch
        assert ch is not None
        assert self.connection is not None
        try:
            jobs = await ch.declare_exchange(JOBS, aio_pika.ExchangeType.DIRECT, durable=True)
            await ch.declare_exchange(EVENTS, aio_pika.ExchangeType.TOPIC, durable=True)
            q = await ch.declare_queue(
                self.queue_name, durable=True, arguments={"x-max-priority": 10}
            )
            await q.bind(jobs, routing_key=self._job_type)
        except ChannelAccessRefused:
            log.info("no configure permission: using the topology the daemon declared")
            ch = self._publish_ch = await self.connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            try:
                await ch.declare_queue(self.queue_name, passive=True)
            except ChannelNotFoundEntity as exc:
                raise QueueMissing(
                    f"rabbitmq: queue {self.queue_name} does not exist yet (the daemon declares "
                    "it at start when the job type is configured)",
                    "rabbitmq",
                ) from exc

    async def consume(self, callback: Callback) -> None:
        await self._start_consuming(callback)

    async def _publish(self, message: Outgoing) -> None:
        if self.closed.is_set() or self._publish_ch is None:
            raise Unavailable("rabbitmq: session closed", "rabbitmq")
        await self.publish_confirmed([message], set())

    async def publish_event(self, event: Event) -> None:
        """Persistent and confirmed. Not mandatory: before any daemon declared the provenance
        stream nothing is bound to jlm.events, and a worker must not stop for that."""
        props = Basic.Properties(
            content_type=JSON,
            headers=_trace_headers(),
            delivery_mode=2,
            priority=0,
            message_id=event.provenance_id,
            message_type=event.type,
        )
        await self._publish(Outgoing(EVENTS, event.type, orjson.dumps(event.body()), props, False))

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
        await self._publish(Outgoing(JOBS, job_type, body, props, True))


def _trace_headers() -> dict[str, Any]:
    """The trace context of the job being handled (its events and retries continue it)."""
    ctx = tracing.current()
    return dict(ctx.headers()) if ctx is not None else {}
