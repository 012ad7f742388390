"""The worker's RabbitMQ side: one session with its job queue, confirmed events and re-publishes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiormq.exceptions import AMQPError, ChannelAccessRefused, DeliveryError, PublishError
from pamqp.commands import Basic

from jlm.broker import EVENTS, JOBS, JSON, connect_first
from jlm.config import Settings, redact_url
from jlm.errors import Unavailable
from jlm.provenance import Event

log = logging.getLogger(__name__)

GEN_HEADER = "x-jlm-gen"
Callback = Callable[[AbstractIncomingMessage], Awaitable[None]]


class WorkerBroker:
    """Consume channel (prefetch = concurrency) and confirmed publish channel of one connection."""

    def __init__(self, settings: Settings, name: str, queue: str, job_type: str, prefetch: int):
        self._settings = settings
        self._name = name
        self.queue_name = queue
        self._job_type = job_type
        self._prefetch = prefetch
        self.connection: AbstractConnection | None = None
        self._consume_ch: AbstractChannel | None = None
        self._publish_ch: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._jobs: AbstractExchange | None = None
        self._events: AbstractExchange | None = None
        self._consumer_tag: str | None = None
        self.closed = asyncio.Event()

    async def open(self) -> None:
        conn = await connect_first(self._settings, self._name)
        self.connection = conn
        conn.close_callbacks.add(lambda *_: self.closed.set())
        try:
            self._publish_ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
            await self._declare()
            self._consume_ch = await conn.channel(publisher_confirms=False)
            await self._consume_ch.set_qos(prefetch_count=self._prefetch)
            self._queue = await self._consume_ch.get_queue(self.queue_name, ensure=False)
        except (AMQPError, OSError, RuntimeError) as exc:
            await self.close()
            raise Unavailable(f"rabbitmq: {type(exc).__name__}: {_safe(exc)}", "rabbitmq") from exc

    async def _declare(self) -> None:
        """Declare exactly as the daemon does (harmless twice); with no configure permission,
        use what the daemon declared."""
        ch = self._publish_ch
        assert ch is not None
        assert self.connection is not None
        try:
            self._jobs = await ch.declare_exchange(JOBS, aio_pika.ExchangeType.DIRECT, durable=True)
            self._events = await ch.declare_exchange(
                EVENTS, aio_pika.ExchangeType.TOPIC, durable=True
            )
            q = await ch.declare_queue(
                self.queue_name, durable=True, arguments={"x-max-priority": 10}
            )
            await q.bind(self._jobs, routing_key=self._job_type)
        except ChannelAccessRefused:
            log.info("no configure permission: using the topology the daemon declared")
            ch = self._publish_ch = await self.connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            self._jobs = await ch.get_exchange(JOBS, ensure=False)
            self._events = await ch.get_exchange(EVENTS, ensure=False)
            await ch.declare_queue(self.queue_name, passive=True)

    async def consume(self, callback: Callback) -> None:
        assert self._queue is not None
        try:
            self._consumer_tag = await self._queue.consume(callback, no_ack=False)
        except (AMQPError, OSError, RuntimeError) as exc:
            raise Unavailable(f"rabbitmq: consume: {_safe(exc)}", "rabbitmq") from exc

    async def stop_consuming(self) -> None:
        if self._queue is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            try:
                await self._queue.cancel(tag)
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

    async def _confirmed(
        self, exchange: AbstractExchange | None, msg: aio_pika.Message, key: str, mandatory: bool
    ) -> None:
        if exchange is None or self.closed.is_set():
            raise Unavailable("rabbitmq: session closed", "rabbitmq")
        try:
            confirm = await exchange.publish(msg, key, mandatory=mandatory)
        except PublishError as exc:
            raise Unavailable(
                f"rabbitmq: unroutable message to {exchange.name}/{key}", "rabbitmq"
            ) from exc
        except (DeliveryError, AMQPError, OSError, RuntimeError) as exc:
            raise Unavailable(f"rabbitmq: publish failed: {_safe(exc)}", "rabbitmq") from exc
        if not isinstance(confirm, Basic.Ack):
            raise Unavailable(f"rabbitmq: broker refused a message to {exchange.name}", "rabbitmq")

    async def publish_event(self, event: Event) -> None:
        """Persistent and confirmed. Not mandatory: before any daemon declared the provenance
        stream nothing is bound to jlm.events, and a worker must not stop for that."""
        msg = aio_pika.Message(
            orjson.dumps(event.body()),
            content_type=JSON,
            message_id=event.provenance_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            type=event.type,
        )
        await self._confirmed(self._events, msg, event.type, False)

    async def publish_job(
        self, body: bytes, job_id: str, job_type: str, priority: int, gen: int
    ) -> None:
        """Re-publish a job message for a retry: same id and priority, the next generation."""
        msg = aio_pika.Message(
            body,
            content_type=JSON,
            message_id=job_id,
            priority=priority,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={GEN_HEADER: gen},
        )
        await self._confirmed(self._jobs, msg, job_type, True)

    async def close(self) -> None:
        if self.connection is not None and not self.connection.is_closed:
            try:
                await self.connection.close()
            except (AMQPError, OSError, RuntimeError) as exc:
                log.debug("close: %s", exc)
        self.closed.set()


def _safe(exc: BaseException) -> str:
    return redact_url(str(exc))[:200]
