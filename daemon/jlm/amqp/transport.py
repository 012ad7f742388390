"""An AMQP connection that writes the frames of one event-loop turn with one system call.

aiormq hands its socket one frame batch at a time (one `basic_publish`, one ack), and the
transport sends each at once: at several messages per request that is several `send` calls per
request, measured at 15-20 % of the daemon's CPU. Here the writer collects what is written during
one turn of the loop and sends it in one piece at the start of the next; the order of the bytes
is unchanged, and `drain`, `write_eof` and `close` send what is held first.

The reader side guards frame decoding (`FrameGuardReader`): a message whose properties the
AMQP library cannot decode would otherwise end the connection on every delivery.

It plugs into aiormq's public `TransportFactory` hook, through an aio-pika `Connection` class.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Iterable
from typing import Any, cast

import aio_pika
import aiormq
import pamqp.frame
from pamqp import commands, decode
from pamqp.base import Frame
from pamqp.commands import Basic
from pamqp.header import ContentHeader
from yarl import URL

log = logging.getLogger(__name__)

# Set on a delivery whose frames could not be decoded as sent; the value says why.
UNDECODABLE = "x-jlm-undecodable"
_FRAME_METHOD, _FRAME_HEADER = 1, 2
# Method frames that carry a message's routing data: Basic.Deliver, Basic.GetOk, Basic.Return.
_CONTENT_METHODS = {struct.pack(">HH", 60, m) for m in (60, 71, 50)}
_FIELD_SIZE = {"octet": 1, "timestamp": 8}


class CoalescingWriter:
    """Wraps a StreamWriter: the writes of one loop turn leave as one `transport.write`.

    Everything but writing is the wrapped writer's own (`transport`, `is_closing`,
    `wait_closed`, ...).
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._held: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(bytes(data))

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
        for chunk in data:
            self.write(chunk)

    def flush(self) -> None:
        """Send what is held (nothing when the transport is closing: its bytes would be lost)."""
        if not self._held:
            return
        held = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held = []
        if not self._writer.transport.is_closing():
            self._writer.write(held)

    async def drain(self) -> None:
        self.flush()
        await self._writer.drain()

    def write_eof(self) -> None:
        self.flush()
        self._writer.write_eof()

    def close(self) -> None:
        self.flush()
        self._writer.close()


class FrameGuardReader:
    """Wraps the StreamReader aiormq reads frames from; rewrites the frames it cannot decode.

    A message property or header value that pamqp cannot decode (a timestamp past the year 9999,
    a string that is not UTF-8, ...) fails aiormq's frame reader, which ends the connection:
    the message is delivered again, first, to the next session, and nothing behind it is ever
    consumed. Here every frame of a delivery is decoded once before aiormq sees it; one that
    fails is replaced by one that decodes: the properties that can be read are kept, the rest
    are dropped, and the headers carry `x-jlm-undecodable` with the reason. The body is never
    touched. Everything but reading is the wrapped reader's own.
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._out = bytearray()
        self._marked: dict[int, str] = {}  # channel -> why its next content header is marked

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    def at_eof(self) -> bool:
        return not self._out and self._reader.at_eof()

    async def readexactly(self, n: int) -> bytes:
        while len(self._out) < n:
            await self._next_frame()
        data = bytes(self._out[:n])
        del self._out[:n]
        return data

    async def read(self, n: int = -1) -> bytes:
        if self._out:
            data = bytes(self._out)
            self._out.clear()
            return data
        return await self._reader.read(n)

    async def _next_frame(self) -> None:
        head = await self._reader.readexactly(7)
        if head.startswith(b"AMQP"):  # the broker's protocol header: passed on as it is
            self._out += head + await self._reader.readexactly(1)
            return
        frame_type, channel, size = struct.unpack(">BHI", head)
        rest = await self._reader.readexactly(size + 1)
        if frame_type == _FRAME_METHOD and rest[:4] in _CONTENT_METHODS:
            self._out += self._checked_method(channel, head + rest)
        elif frame_type == _FRAME_HEADER:
            self._out += self._checked_header(channel, head + rest)
        else:
            self._out += head + rest

    def _checked_method(self, channel: int, frame: bytes) -> bytes:
        try:
            pamqp.frame.unmarshal(frame)
        except Exception as exc:  # any failure here would end the connection
            reason = f"method frame: {type(exc).__name__}: {exc}"[:200]
            fixed = _readable_method(frame)
            if fixed is not None:
                self._marked[channel] = reason
                return fixed
            log.error("undecodable frame on channel %d left as it is: %s", channel, reason)
        return frame

    def _checked_header(self, channel: int, frame: bytes) -> bytes:
        reason = self._marked.pop(channel, None)
        if reason is None:
            try:
                pamqp.frame.unmarshal(frame)
                return frame
            except Exception as exc:  # any failure here would end the connection
                reason = f"{type(exc).__name__}: {exc}"[:200]
        # Not a warning: whoever may publish could flood the log; the daemon reports the
        # rejection (rate-limited) and counts it.
        log.debug("delivery on channel %d has undecodable properties: %s", channel, reason)
        return _readable_header(channel, frame[7:-1], reason)


def _readable_method(frame: bytes) -> bytes | None:
    """A Basic.Deliver/GetOk/Return frame with its short strings decoded leniently (U+FFFD)."""
    try:
        channel = struct.unpack(">H", frame[1:3])[0]
        payload = frame[7:-1]
        method: type[Frame] = commands.INDEX_MAPPING[struct.unpack(">I", payload[:4])[0]]
        data = payload[4:]
        values: dict[str, Any] = {}
        offset, in_bits = 0, False
        for name in method.__slots__:
            kind = method.amqp_type(name)
            if in_bits and (kind != "bit" or offset == 8):
                data, offset, in_bits = data[1:], 0, False
            if kind == "bit":
                values[name] = decode.bit(data, offset)[1]
                offset, in_bits = offset + 1, True
                continue
            if kind == "shortstr":
                consumed = 1 + data[0]
                values[name] = data[1:consumed].decode("utf-8", "replace")
            else:
                consumed, values[name] = decode.by_type(data, kind)
            data = data[consumed:]
        return pamqp.frame.marshal(method(**values), channel)
    except Exception:  # nothing better to offer: the frame goes on as it is
        return None


def _readable_header(channel: int, payload: bytes, reason: str) -> bytes:
    """A content header frame with the properties that decode, and `x-jlm-undecodable`."""
    _, _, body_size = struct.unpack(">HHQ", payload[:12])
    props: dict[str, Any] = {}
    try:
        flags = struct.unpack(">H", payload[12:14])[0]
        data = payload[14:] if not flags & 1 else b""  # one flag word (14 properties)
        for name in Basic.Properties.__slots__:
            if not flags & Basic.Properties.flags[name]:
                continue
            kind = getattr(Basic.Properties, "_" + name)
            size = _field_size(kind, data)
            with contextlib.suppress(Exception):  # dropped; the next starts after it
                props[name] = decode.by_type(data[:size], kind)[1]
            data = data[size:]
    except (struct.error, IndexError):
        pass  # truncated: keep what was read
    headers = props.get("headers")
    props["headers"] = {**(headers if isinstance(headers, dict) else {}), UNDECODABLE: reason}
    try:
        marshalled = pamqp.frame.marshal(
            ContentHeader(0, body_size, Basic.Properties(**props)), channel
        )
    except Exception:  # a kept property pamqp cannot write back: the marker alone
        marshalled = pamqp.frame.marshal(
            ContentHeader(0, body_size, Basic.Properties(headers={UNDECODABLE: reason})),
            channel,
        )
    return marshalled


def _field_size(kind: str, data: bytes) -> int:
    if kind == "shortstr":
        return 1 + data[0]
    if kind in ("table", "longstr"):
        return 4 + int(struct.unpack(">I", data[:4])[0])
    return _FIELD_SIZE[kind]


class CoalescingTransportFactory(aiormq.TransportFactory):
    """aiormq's own TCP or TLS transport, with a coalescing writer; `used` counts the
    transports it made (`in_place` reads it)."""

    def __init__(self, tls: bool) -> None:
        self._inner: aiormq.TransportFactory = (
            aiormq.connection.TLSTransportFactory()
            if tls
            else aiormq.connection.TCPTransportFactory()
        )
        self.used = 0
        self.writer: CoalescingWriter | None = None  # of the last transport made (`jlm.amqp.lean`)

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await self._inner.create(url, **kwargs)
        self.used += 1
        self.writer = CoalescingWriter(writer)
        # Duck-typed: aiormq uses write, drain, close, is_closing, write_eof and transport;
        # readexactly, read and at_eof.
        return (
            cast(asyncio.StreamReader, FrameGuardReader(reader)),
            cast(asyncio.StreamWriter, self.writer),
        )


class CoalescingConnection(aio_pika.Connection):
    """aio-pika's Connection over the coalescing transport.

    Used as `aio_pika.connect(url, connection_class=CoalescingConnection)`.
    """

    def __init__(self, url: URL, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        # aio-pika passes its `kwargs` on to aiormq's connect (not a public hook: `in_place`
        # checks, on every connection, that the factory was used).
        self.factory = CoalescingTransportFactory(URL(url).scheme == "amqps")
        self.kwargs["transport_factory"] = self.factory


def in_place(connection: object) -> bool:
    """Whether an open connection reads and writes through this module (frame guard and
    coalescing writer): False if aio-pika or aiormq stopped passing the factory on."""
    return isinstance(connection, CoalescingConnection) and connection.factory.used > 0
