"""The lean publish and ack path: pre-encoded frames written straight to the connection.

aiormq's `basic_publish` builds three pamqp objects per message, marshals them, takes the
channel's lock, enters a timeout, queues the frames for its writer task and keeps two dicts per
message; a `multiple` confirm walks every outstanding confirm. Measured: about a quarter of the
daemon's CPU (docs/performance.md). Here, for the channels a session publishes and acks on:

- the properties of a message are encoded once, by hand, in the order and with the flags pamqp
  uses (`properties`); anything else goes through pamqp (`encoded`);
- a publish is one `bytes` of method, header and body frames, written to the connection's
  coalescing writer in the caller's turn (`LeanChannel.publish`): the frames of one loop turn
  leave in one `send`, in the order they were written;
- a publisher confirm resolves its future directly (`LeanChannel` replaces the channel's confirm
  handler): a `multiple` confirm pops from the oldest outstanding tag and stops at the first
  newer one;
- acks are written as frames too: those of one loop turn that continue the run of acked
  deliveries go as one `multiple` ack, the rest (above one still being handled) one by one
  (`Acks`);
- a delivery is handed to the daemon as it came from aiormq's frames (`Delivery`): aio-pika's
  IncomingMessage copied every property into a new object and ran the callback in a second task.

What this takes from aiormq (the channel's `delivery_tag` counter, `confirmations` and
`message_id_delivery_tag` maps, `_on_confirm_frame` hook, `max_content_size`, `create_future`)
is checked on every channel it is used on (`missing`); a channel that lacks any of it keeps
aiormq's own path, with an ERROR naming the versions. tests/test_amqp_lean.py checks the frames
against pamqp's and runs the path against RabbitMQ; pyproject.toml pins aio-pika and aiormq to the
minor releases tested.

Every publish and ack of a channel that uses this path must go through it: aiormq's own
publishes would take delivery tags out of turn.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable, Mapping
from importlib.metadata import version
from typing import Any, Protocol

import aiormq
from aiormq.abc import ConfirmationFrameType, DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError, DeliveryError
from pamqp import encode
from pamqp.commands import Basic

log = logging.getLogger(__name__)

_FRAME_END = b"\xce"
_FLAGS = Basic.Properties.flags
_EMPTY_TABLE = b"\x00\x00\x00\x00"
_PUBLISH = struct.pack(">HHH", 60, 40, 0)  # Basic.Publish, reserved ticket
_HEADER = struct.pack(">HH", 60, 0)  # class Basic, weight
_ACK = struct.pack(">HH", 60, 80)  # Basic.Ack
# What a channel must have for the lean path (see the module's docstring).
_NEEDED = ("delivery_tag", "confirmations", "message_id_delivery_tag", "_on_confirm_frame",
           "max_content_size", "create_future", "number", "is_closed")  # fmt: skip


def _shortstr(value: str) -> bytes:
    data = value.encode()
    if len(data) > 255:
        raise ValueError(f"AMQP short string over 255 bytes: {value[:40]!r}…")
    return bytes((len(data),)) + data


def properties(
    *,
    content_type: str,
    headers: dict[str, Any],
    delivery_mode: int,
    priority: int,
    correlation_id: str | None = None,
    message_id: str | None = None,
    message_type: str | None = None,
) -> bytes:
    """The encoded properties of one of the daemon's messages: what
    `Basic.Properties(...).marshal()` gives for the same values, without building the object."""
    flags = _FLAGS["headers"] | _FLAGS["delivery_mode"] | _FLAGS["priority"]
    parts = [b""]
    if content_type:
        flags |= _FLAGS["content_type"]
        parts.append(_shortstr(content_type))
    parts += [
        encode.field_table(headers) if headers else _EMPTY_TABLE,
        bytes((delivery_mode, priority)),
    ]
    if correlation_id:
        flags |= _FLAGS["correlation_id"]
        parts.append(_shortstr(correlation_id))
    if message_id:
        flags |= _FLAGS["message_id"]
        parts.append(_shortstr(message_id))
    if message_type:
        flags |= _FLAGS["message_type"]
        parts.append(_shortstr(message_type))
    parts[0] = struct.pack(">H", flags)
    return b"".join(parts)


def encoded(props: Basic.Properties) -> bytes:
    """Any properties, encoded by pamqp (dead letters, a worker's retried job)."""
    return props.marshal()


def decoded(data: bytes) -> Basic.Properties:
    """Encoded properties as pamqp's object again (aiormq's own publish path)."""
    props = Basic.Properties()
    props.unmarshal(struct.unpack(">H", data[:2])[0], data[2:])
    return props


_routes: dict[tuple[str, str, bool], bytes] = {}


def _route(exchange: str, routing_key: str, mandatory: bool) -> bytes:
    """Exchange, routing key and flags of a Basic.Publish: cached for the daemon's own exchanges
    (routing keys there are job and event types, a bounded set); encoded afresh otherwise."""
    key = (exchange, routing_key, mandatory)
    route = _routes.get(key)
    if route is None:
        route = _shortstr(exchange) + _shortstr(routing_key) + (b"\x01" if mandatory else b"\x00")
        if exchange and len(_routes) < 4096:
            _routes[key] = route
    return route


def publish_frames(
    channel: int, exchange: str, routing_key: str, body: bytes, *,
    props: bytes, mandatory: bool, max_body: int,
) -> bytes:  # fmt: skip
    """Basic.Publish, its content header and body frames (bodies split at `max_body` bytes)."""
    method = _PUBLISH + _route(exchange, routing_key, mandatory)
    header = _HEADER + struct.pack(">Q", len(body)) + props
    parts = [
        struct.pack(">BHI", 1, channel, len(method)), method, _FRAME_END,
        struct.pack(">BHI", 2, channel, len(header)), header, _FRAME_END,
    ]  # fmt: skip
    for start in range(0, len(body), max_body):
        chunk = body[start : start + max_body]
        parts += [struct.pack(">BHI", 3, channel, len(chunk)), chunk, _FRAME_END]
    return b"".join(parts)


def ack_frame(channel: int, delivery_tag: int, multiple: bool) -> bytes:
    payload = _ACK + struct.pack(">QB", delivery_tag, multiple)
    return struct.pack(">BHI", 1, channel, len(payload)) + payload + _FRAME_END


def missing(channel: object) -> list[str]:
    """What the lean path needs and this channel lacks (empty: it can be used)."""
    return [name for name in _NEEDED if not hasattr(channel, name)]


def versions() -> str:
    return f"aio-pika {version('aio-pika')}, aiormq {version('aiormq')}"


Write = Callable[[bytes], None]


class LeanChannel:
    """Publishes on one aiormq channel with pre-encoded frames.

    On a channel in confirm mode `publish` returns the future of the broker's confirm: its result
    is the Basic.Ack; a Basic.Nack fails it with DeliveryError; a mandatory message the broker
    returned fails it with aiormq's PublishError (aiormq's return handler finds it by message id);
    a closed channel fails it with the channel's error. Without confirms it returns None.
    """

    def __init__(
        self, channel: aiormq.Channel, write: Write, is_closing: Callable[[], bool], *,
        confirm_timeout: float = 30.0,
    ) -> None:  # fmt: skip
        self._ch = channel
        self._write = write
        self._is_closing = is_closing
        self._confirms = channel.publisher_confirms
        self._ids: dict[int, str] = {}  # delivery tag -> message id, mandatory messages only
        # Confirms not in after `confirm_timeout` fail with TimeoutError: one timer looks at the
        # oldest outstanding publish now and then, instead of a timer per publish.
        self._timeout = confirm_timeout
        self._sent: deque[tuple[int, float]] = deque()  # (delivery tag, when), oldest first
        self._watch: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        if self._confirms:
            # An instance attribute: aiormq's reader looks the handler up on the channel.
            channel._on_confirm_frame = self._on_confirm  # type: ignore[method-assign]

    def publish(
        self, exchange: str, routing_key: str, body: bytes, props: bytes, *,
        mandatory: bool = False, message_id: str = "",
    ) -> asyncio.Future[Any] | None:  # fmt: skip
        ch = self._ch
        if ch.is_closed or self._is_closing():
            raise ChannelInvalidStateError(f"channel {ch.number} is closed")
        if mandatory and self._confirms and not message_id:
            raise ValueError("a mandatory message needs a message id (returns find it by it)")
        frames = publish_frames(
            ch.number, exchange, routing_key, body,
            props=props, mandatory=mandatory, max_body=ch.max_content_size,
        )  # fmt: skip
        confirm = None
        if self._confirms:
            ch.delivery_tag += 1
            tag = ch.delivery_tag
            confirm = ch.create_future()
            ch.confirmations[tag] = confirm
            if mandatory:
                self._ids[tag] = message_id
                ch.message_id_delivery_tag[message_id] = tag
            self._sent.append((tag, self._loop.time()))
            if self._watch is None:
                self._watch = self._loop.call_later(self._timeout / 4, self._check)
        self._write(frames)
        return confirm

    def _check(self) -> None:
        """Fail every outstanding confirm once the oldest has waited `confirm_timeout`."""
        self._watch = None
        pending, sent = self._ch.confirmations, self._sent
        while sent and sent[0][0] not in pending:
            sent.popleft()
        if not sent:
            return
        if self._loop.time() - sent[0][1] < self._timeout:
            self._watch = self._loop.call_later(self._timeout / 4, self._check)
            return
        sent.clear()
        for future in list(pending.values()):
            if isinstance(future, asyncio.Future) and not future.done():
                future.set_exception(TimeoutError(f"no confirm in {self._timeout:.0f}s"))

    async def _on_confirm(self, frame: ConfirmationFrameType) -> None:
        pending = self._ch.confirmations
        tag = frame.delivery_tag or 0
        if not getattr(frame, "multiple", False):
            future = pending.pop(tag, None)
            if future is not None:
                self._settle(tag, future, frame)
            return
        while pending:
            oldest = next(iter(pending))
            if oldest > tag:
                break
            self._settle(oldest, pending.pop(oldest), frame)
        sent = self._sent
        while sent and sent[0][0] <= tag:
            sent.popleft()

    def _settle(self, tag: int, future: object, frame: ConfirmationFrameType) -> None:
        message_id = self._ids.pop(tag, None)
        if message_id is not None and self._ch.message_id_delivery_tag.get(message_id) == tag:
            del self._ch.message_id_delivery_tag[message_id]
        # aiormq leaves a marker (not a future) where it has settled a returned message.
        if not isinstance(future, asyncio.Future) or future.done():
            return
        if isinstance(frame, Basic.Ack):
            future.set_result(frame)
        else:
            future.set_exception(DeliveryError(None, frame))


class Acks:
    """Acks of one consume channel, written as frames once per loop turn.

    A `multiple` ack covers every unacked delivery up to its tag, and the broker refuses one
    whose own tag is already acked. So the acks of a turn that continue the run of acked tags
    from the channel's first delivery go as one `multiple` ack at the newest of them; the others
    (above a delivery still being handled) go one by one, and join the run once it reaches them.
    A delivery that takes long never holds the acks of later ones back. Acks leave after
    whatever was written before them (a request's reply).
    """

    # Tags acked one by one above a gap that never closes (a delivery never acked): past this
    # many the channel's acks all go one by one, without the run.
    MAX_ABOVE = 100_000

    def __init__(self, channel_number: int, write: Write, is_closing: Callable[[], bool]):
        self._number = channel_number
        self._write = write
        self._is_closing = is_closing
        self._upto = 0  # every delivery tag up to this one is acked
        self._above: set[int] | None = set()  # tags acked above `_upto`; None: no run kept
        self._done: list[int] = []  # this turn's acks, not written yet
        self._loop = asyncio.get_running_loop()

    def ack(self, tag: int) -> None:
        if self._is_closing():
            raise ChannelInvalidStateError(f"channel {self._number} is closed")
        if not self._done:
            self._loop.call_soon(self.flush)
        self._done.append(tag)

    def flush(self) -> None:
        done, self._done = self._done, []
        if not done or self._is_closing():
            return
        above = self._above
        if above is None:
            self._write(b"".join(ack_frame(self._number, t, False) for t in done))
            return
        above.update(done)
        upto = self._upto
        while upto + 1 in above:
            upto += 1
            above.remove(upto)
        self._upto = upto
        in_run = [t for t in done if t <= upto]
        frames = [ack_frame(self._number, max(in_run), True)] if in_run else []
        frames += [ack_frame(self._number, t, False) for t in done if t > upto]
        self._write(b"".join(frames))
        if len(above) > self.MAX_ABOVE:
            log.warning("channel %d: a delivery stays unacked; acks go one by one", self._number)
            self._above = None


class Incoming(Protocol):
    """What the daemon reads of a delivery: aio-pika's IncomingMessage has it, and `Delivery`."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, Any]: ...
    @property
    def channel(self) -> aiormq.abc.AbstractChannel: ...
    @property
    def delivery_tag(self) -> int | None: ...
    @property
    def redelivered(self) -> bool | None: ...
    @property
    def routing_key(self) -> str | None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def content_encoding(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def reply_to(self) -> str | None: ...
    @property
    def user_id(self) -> str | None: ...
    @property
    def type(self) -> str | None: ...


class Delivery:
    """One delivery as aiormq read it: the body, the routing data and the properties the
    daemon reads, as plain attributes."""

    __slots__ = ("body", "channel", "content_encoding", "content_type", "correlation_id",
                 "delivery_tag", "headers", "message_id", "redelivered", "reply_to",
                 "routing_key", "type", "user_id")  # fmt: skip

    def __init__(self, message: DeliveredMessage) -> None:
        props = message.header.properties
        self.body: bytes = message.body
        self.channel: aiormq.abc.AbstractChannel = message.channel
        self.delivery_tag = message.delivery_tag
        self.redelivered = message.redelivered
        self.routing_key = message.routing_key
        self.headers: Mapping[str, Any] = props.headers or {}
        self.content_type = props.content_type
        self.content_encoding = props.content_encoding
        self.message_id = props.message_id
        self.correlation_id = props.correlation_id
        self.reply_to = props.reply_to
        self.user_id = props.user_id
        self.type = props.message_type
