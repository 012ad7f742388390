"""An AMQP connection that writes the frames of one event-loop turn with one system call.

aiormq hands its socket one frame batch at a time (one `basic_publish`, one ack), and the
transport sends each at once: at several messages per request that is several `send` calls per
request, measured at 15-20 % of the daemon's CPU. Here the writer collects what is written during
one turn of the loop and sends it in one piece at the start of the next; the order of the bytes
is unchanged, and `drain`, `write_eof` and `close` send what is held first.

It plugs into aiormq's public `TransportFactory` hook, through an aio-pika `Connection` class.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, cast

import aio_pika
import aiormq
from yarl import URL


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


class CoalescingTransportFactory(aiormq.TransportFactory):
    """aiormq's own TCP or TLS transport, with a coalescing writer."""

    def __init__(self, tls: bool) -> None:
        self._inner: aiormq.TransportFactory = (
            aiormq.connection.TLSTransportFactory()
            if tls
            else aiormq.connection.TCPTransportFactory()
        )

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await self._inner.create(url, **kwargs)
        # Duck-typed: aiormq uses write, drain, close, is_closing, write_eof and transport.
        return reader, cast(asyncio.StreamWriter, CoalescingWriter(writer))


class CoalescingConnection(aio_pika.Connection):
    """aio-pika's Connection over the coalescing transport.

    Used as `aio_pika.connect(url, connection_class=CoalescingConnection)`.
    """

    def __init__(self, url: URL, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        self.kwargs["transport_factory"] = CoalescingTransportFactory(URL(url).scheme == "amqps")
