"""One AMQP connection with a consumer and a confirmed publish channel, and the messages it
publishes: the daemon's `Broker` and the worker's `WorkerBroker` are two kinds of session."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import aiormq
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiormq.exceptions import AMQPError, DeliveryError, PublishError
from pamqp.commands import Basic

from jlm.amqp.connect import connect_first, why
from jlm.amqp.names import EVENTS, JOBS, JSON
from jlm.config import Settings
from jlm.errors import Unavailable

if TYPE_CHECKING:
    from jlm.protocol import JobMessage
    from jlm.provenance import Event

log = logging.getLogger(__name__)

# Longest wait for a publisher confirm; a persistent message is normally confirmed in ms.
CONFIRM_TIMEOUT = 30.0

Callback = Callable[[AbstractIncomingMessage], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish with a confirm. `job` and `event` build the daemon's and the
    workers' messages with the properties aio_pika.Message would, without its per-message cost."""

    exchange: str
    routing_key: str
    body: bytes
    properties: Basic.Properties
    mandatory: bool

    @property
    def message_id(self) -> str:
        return self.properties.message_id or ""

    @classmethod
    def job(cls, job: JobMessage, headers: dict[str, Any]) -> Outgoing:
        """A job message on jlm.jobs, routed by its type: persistent, at its priority, with its
        job id as message id; mandatory (a job no queue takes is a failure)."""
        props = Basic.Properties(
            content_type=JSON,
            headers=headers,
            delivery_mode=2,
            priority=job.priority,
            message_id=job.job_id,
        )
        return cls(JOBS, job.job_type, orjson.dumps(job.body()), props, True)

    @classmethod
    def event(cls, event: Event, headers: dict[str, Any], *, mandatory: bool = True) -> Outgoing:
        """A provenance event on jlm.events, routed by its type: persistent, with its
        provenance id as message id and its type as message type."""
        props = Basic.Properties(
            content_type=JSON,
            headers=headers,
            delivery_mode=2,
            priority=0,
            message_id=event.provenance_id,
            message_type=event.type,
        )
        return cls(EVENTS, event.type, orjson.dumps(event.body()), props, mandatory)


async def raw_channel(channel: AbstractChannel | None) -> aiormq.Channel:
    """The aiormq channel under an aio-pika one (its publish can skip waiting for the socket)."""
    assert channel is not None
    return cast(aiormq.Channel, await channel.get_underlay_channel())


def cancelled_here() -> bool:
    """Whether this task itself is being cancelled.

    aiormq fails the pending calls of a connection it found stuck with a CancelledError that is
    not addressed to the caller; only a real cancellation of the caller may propagate.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


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
            if isinstance(exc, asyncio.CancelledError) and cancelled_here():
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
            channel = await raw_channel(self._publish_ch)
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
