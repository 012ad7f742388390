"""One AMQP connection with a consumer and a confirmed publish channel, and the messages it
publishes: the daemon's `Broker` and the worker's `WorkerBroker` are two kinds of session."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import aiormq
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractQueue,
)
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import AMQPError, DeliveryError, PublishError
from pamqp.commands import Basic

from jlm.amqp import lean
from jlm.amqp.connect import connect_first, why
from jlm.amqp.names import EVENTS, JOBS, JSON
from jlm.amqp.transport import CoalescingConnection, CoalescingWriter
from jlm.config import Settings
from jlm.errors import Unavailable

if TYPE_CHECKING:
    from jlm.protocol import JobMessage
    from jlm.provenance import Event

log = logging.getLogger(__name__)

# Longest wait for a publisher confirm; a persistent message is normally confirmed in ms.
CONFIRM_TIMEOUT = 30.0
# Longest wait for the broker's answer to a connection close (a silent connection never answers).
CLOSE_TIMEOUT = 5.0

Callback = Callable[[lean.Incoming], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish with a confirm, its properties encoded (`jlm.amqp.lean`). `job`
    and `event` build the daemon's and the workers' messages with the properties aio_pika.Message
    would, encoded without building them; `of` takes any `Basic.Properties`."""

    exchange: str
    routing_key: str
    body: bytes
    header: bytes  # the encoded properties
    mandatory: bool
    message_id: str

    @classmethod
    def of(
        cls, exchange: str, routing_key: str, body: bytes, properties: Basic.Properties,
        mandatory: bool,
    ) -> Outgoing:  # fmt: skip
        return cls(exchange, routing_key, body, lean.encoded(properties), mandatory,
                   properties.message_id or "")  # fmt: skip

    @classmethod
    def job(cls, job: JobMessage, headers: dict[str, Any]) -> Outgoing:
        """A job message on jlm.jobs, routed by its type: persistent, at its priority, with its
        job id as message id; mandatory (a job no queue takes is a failure)."""
        header = lean.properties(
            content_type=JSON,
            headers=headers,
            delivery_mode=2,
            priority=job.priority,
            message_id=job.job_id,
        )
        return cls(JOBS, job.job_type, orjson.dumps(job.body()), header, True, job.job_id)

    @classmethod
    def event(cls, event: Event, headers: dict[str, Any], *, mandatory: bool = True) -> Outgoing:
        """A provenance event on jlm.events, routed by its type: persistent, with its
        provenance id as message id and its type as message type."""
        header = lean.properties(
            content_type=JSON,
            headers=headers,
            delivery_mode=2,
            priority=0,
            message_id=event.provenance_id,
            message_type=event.type,
        )
        body = orjson.dumps(event.body())
        return cls(EVENTS, event.type, body, header, mandatory, event.provenance_id)

    def properties(self) -> Basic.Properties:
        """The properties as pamqp objects (aiormq's own publish path)."""
        return lean.decoded(self.header)


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


@contextlib.contextmanager
def failure_ends_it(what: str) -> Iterator[None]:
    """Around a broker call whose failure only ends it: the AMQP library's errors, and the
    CancelledError aiormq fails a given-up connection's calls with, are logged at debug; a
    cancellation of this task itself goes on."""
    try:
        yield
    except (AMQPError, OSError, RuntimeError) as exc:
        log.debug("%s: %s", what, exc)
    except asyncio.CancelledError:
        if cancelled_here():
            raise
        log.debug("%s: the connection failed the call", what)


class AmqpSession:
    """One AMQP connection with a consumer and a confirmed publish channel; the daemon's `Broker`
    and the worker's `WorkerBroker` are two kinds of it."""

    # Whether the consume channel is read and acked by the lean path (`_start_consuming`,
    # `ack`): then every settlement of its deliveries must go through `ack` (lean.Acks).
    lean_consume = False

    def __init__(self, settings: Settings, name: str) -> None:
        self._settings = settings
        self._name = name  # the connection name the broker shows
        self.connection: AbstractConnection | None = None
        self._consume_ch: AbstractChannel | None = None
        self._publish_ch: AbstractChannel | None = None
        self._consume_queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self.closed = asyncio.Event()
        # The lean publish and ack path (`jlm.amqp.lean`), where the channel allows it.
        self._lean_publish: lean.LeanChannel | None = None
        self._acks: lean.Acks | None = None
        self._acks_channel: aiormq.Channel | None = None

    async def open(self) -> None:
        """Connect to the first node that answers and set the session up; Unavailable if not."""
        conn = await connect_first(self._settings, self._name)
        self.connection = conn
        conn.close_callbacks.add(lambda *_: self.closed.set())
        try:
            await self._setup(conn)
            self._lean_publish = await self.lean_channel(self._publish_ch)
            ready = await self._lean_ready(self._consume_ch) if self.lean_consume else None
            if ready is not None:
                self._acks_channel, writer = ready
                self._acks = lean.Acks(self._acks_channel.number, writer.write, writer.is_closing)
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

    async def _lean_ready(
        self, channel: AbstractChannel | None
    ) -> tuple[aiormq.Channel, CoalescingWriter] | None:
        """The aiormq channel under `channel` and the connection's writer, when the lean path can
        use them; None (after an ERROR naming what is missing) if the AMQP library under it no
        longer offers what it needs."""
        if channel is None:
            return None
        raw = await raw_channel(channel)
        writer = self._writer()
        gaps = lean.missing(raw) + ([] if writer is not None else ["the coalescing writer"])
        if writer is None or gaps:
            log.error(
                "the lean AMQP path is not in use (%s lacks %s): AMQP takes aiormq's and "
                "aio-pika's slower paths; jlm is tested with the releases pyproject.toml pins",
                lean.versions(), ", ".join(gaps),
            )  # fmt: skip
            return None
        return raw, writer

    async def lean_channel(self, channel: AbstractChannel | None) -> lean.LeanChannel | None:
        """The lean publish path on a channel of this session, or None (`_lean_ready`)."""
        ready = await self._lean_ready(channel)
        if ready is None:
            return None
        raw, writer = ready
        return lean.LeanChannel(
            raw, writer.write, writer.is_closing, confirm_timeout=CONFIRM_TIMEOUT
        )

    def _writer(self) -> CoalescingWriter | None:
        conn = self.connection
        return conn.factory.writer if isinstance(conn, CoalescingConnection) else None

    async def _start_consuming(self, callback: Callback) -> None:
        """Consume the session's queue: by the lean path (`lean.Delivery` straight from aiormq)
        where the consume channel has it, else through aio-pika."""
        assert self._consume_queue is not None
        try:
            if self._acks_channel is not None:

                async def on_delivery(message: DeliveredMessage) -> None:
                    await callback(lean.Delivery(message))

                ok = await self._acks_channel.basic_consume(
                    self._consume_queue.name, on_delivery, no_ack=False
                )
                self._consumer_tag = ok.consumer_tag
            else:
                self._consumer_tag = await self._consume_queue.consume(callback, no_ack=False)
        except (AMQPError, OSError, RuntimeError) as exc:
            raise Unavailable(f"rabbitmq: consume: {why(exc)}", "rabbitmq") from exc

    async def stop_consuming(self) -> None:
        if self._consume_queue is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            with failure_ends_it("cancel consumer"):
                if self._acks_channel is not None:
                    await self._acks_channel.basic_cancel(tag)
                else:
                    await self._consume_queue.cancel(tag)

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

    def _failure(
        self, m: Outgoing, exc: BaseException | None, confirm: object
    ) -> Unavailable | None:
        """What a publish came to: None when the broker confirmed it (`confirm` a Basic.Ack)."""
        if isinstance(exc, PublishError):
            # Returned: nothing is bound for it (e.g. the job queue was deleted).
            self._returned()
            return Unavailable(f"rabbitmq: unroutable message to {m.exchange}/{m.routing_key}",
                               "rabbitmq")  # fmt: skip
        if exc is not None:
            return Unavailable(f"rabbitmq: publish failed: {why(exc)}", "rabbitmq")
        if not isinstance(confirm, Basic.Ack):
            return Unavailable(
                f"rabbitmq: broker refused a message to {m.exchange}/{m.routing_key}", "rabbitmq"
            )
        return None

    async def _confirmed(self, m: Outgoing) -> Unavailable | None:
        """aiormq's own path: publish one message and wait for its confirm (callers bound the
        wait), without waiting for the frame to reach the socket."""
        try:
            channel = await raw_channel(self._publish_ch)
            confirm = await channel.basic_publish(
                m.body,
                exchange=m.exchange,
                routing_key=m.routing_key,
                properties=m.properties(),
                mandatory=m.mandatory,
                wait=False,
            )
        except (PublishError, DeliveryError, AMQPError, OSError, RuntimeError) as exc:
            return self._failure(m, exc, None)
        return self._failure(m, None, confirm)

    async def _confirmed_lean(
        self, lean_ch: lean.LeanChannel, todo: list[Outgoing]
    ) -> list[Unavailable | None]:
        """The lean path: every message written at once, then their confirms awaited in turn
        (no task or timer per message: the channel fails a confirm not in within
        CONFIRM_TIMEOUT with TimeoutError, raised here)."""
        sent: list[asyncio.Future[Any] | Unavailable | None] = []
        for m in todo:
            try:
                sent.append(lean_ch.publish(
                    m.exchange, m.routing_key, m.body, m.header,
                    mandatory=m.mandatory, message_id=m.message_id,
                ))  # fmt: skip
            except (AMQPError, OSError, RuntimeError, ValueError) as exc:
                sent.append(self._failure(m, exc, None))
        results: list[Unavailable | None] = []
        late = False
        for m, f in zip(todo, sent, strict=True):
            if not isinstance(f, asyncio.Future):
                results.append(f)
                continue
            try:
                results.append(self._failure(m, None, await f))
            except TimeoutError:
                late = True
            except asyncio.CancelledError:
                if cancelled_here():
                    raise
                results.append(Unavailable("rabbitmq: publish failed: cancelled", "rabbitmq"))
            except (PublishError, DeliveryError, AMQPError, OSError, RuntimeError) as exc:
                results.append(self._failure(m, exc, None))
        if late:
            raise TimeoutError
        return results

    async def publish_confirmed(self, messages: list[Outgoing], done: set[str]) -> None:
        """Publish the messages not in `done` at once; add each confirmed one's id to `done`.

        Raises the first failure once every confirm is in, so that a retry publishes only what
        the broker has not confirmed.
        """
        todo = [m for m in messages if m.message_id not in done]
        if not todo:
            return
        try:
            if self._lean_publish is not None:
                results = await self._confirmed_lean(self._lean_publish, todo)
            else:
                async with asyncio.timeout(CONFIRM_TIMEOUT):
                    results = list(await asyncio.gather(*(self._confirmed(m) for m in todo)))
        except TimeoutError as exc:
            # RabbitMQ 3.10 can lose the confirm of a message sent to a stream (or replicated
            # queue) whose leader node just died (tests/cluster). The channel is not trusted
            # again: the session ends, and its unacked requests are redelivered and replayed.
            log.warning("no confirm from the broker in %.0fs: ending the session", CONFIRM_TIMEOUT)
            self.closed.set()
            raise Unavailable("rabbitmq: no confirm from the broker", "rabbitmq") from exc
        failure: Unavailable | None = None
        for message, result in zip(todo, results, strict=True):
            if result is None:
                done.add(message.message_id)
            elif failure is None:
                failure = result
        if failure is not None:
            raise failure

    async def ack(self, message: lean.Incoming) -> None:
        """Ack a delivery, without waiting for the frame to reach the socket: on the consume
        channel by the lean path (`lean.Acks`: one `multiple` ack for a turn's run), elsewhere on
        its own channel.

        The ack follows the reply's frames on the connection. Lost with the connection, the
        request is redelivered and its recorded decision replayed.
        """
        assert message.delivery_tag is not None
        raw = message.channel  # aiormq's channel
        if self._acks is not None and raw is self._acks_channel:
            self._acks.ack(message.delivery_tag)
        else:
            await raw.basic_ack(message.delivery_tag, wait=False)

    async def close(self) -> None:
        if self.connection is not None and not self.connection.is_closed:
            with failure_ends_it("close"):  # its TimeoutError too: an OSError
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self.connection.close()
        self.closed.set()
