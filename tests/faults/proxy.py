"""A small TCP proxy in front of the shared broker, to cut or stall the daemon's connections.

The shared RabbitMQ must never be stopped or paused: faults are made here, on loopback, and only
the connections that go through this proxy see them.

- `reset()`: abort every current connection with a TCP RST (both sides), as a crashed peer or a
  firewall would; new connections are accepted as before.
- `blackhole()`: stop forwarding on every current connection, silently, in both directions; the
  sockets stay open, so only heartbeats can tell. New connections are forwarded normally (a fresh
  path works; the old one is wedged), unless `blackhole(new_too=True)`.
- `heal()`: forward new connections again (the wedged ones stay wedged until their peers give up).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream twin."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    stalled: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), not FIN: the peer sees ECONNRESET."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Proxy:
    """Forward 127.0.0.1:<port> to an upstream host:port, with faults on demand."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._up = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._stall_new = False
        self.accepted = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def live_links(self) -> int:
        return sum(1 for link in self._links if not link.stalled)

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset()
        if self._server is not None:
            await self._server.wait_closed()

    def reset(self) -> int:
        """RST every current connection; return how many were cut."""
        links = list(self._links)
        for link in links:
            self._drop(link)
        return len(links)

    def blackhole(self, *, new_too: bool = False) -> int:
        """Stop forwarding on every current connection (and new ones if `new_too`)."""
        self._stall_new = new_too
        for link in self._links:
            link.stalled = True
        return len(self._links)

    def heal(self) -> None:
        self._stall_new = False

    def _drop(self, link: _Link) -> None:
        self._links.discard(link)
        _abort(link.client)
        _abort(link.upstream)
        for task in link.tasks:
            task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._up)
        except OSError:
            _abort(writer)
            return
        link = _Link(writer, up_writer, stalled=self._stall_new)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, up_writer)),
            asyncio.create_task(self._pump(link, up_reader, writer)),
        ]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            pass  # the loop is closing: asyncio would log a cancelled connection handler
        if link in self._links:
            self._drop(link)

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if link.stalled:
                    continue  # swallowed: the wedged path delivers nothing, and says nothing
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        if link.stalled:
            # A wedged path never reports a close either: keep the other side hanging.
            await asyncio.Event().wait()
        if link in self._links:
            self._drop(link)
