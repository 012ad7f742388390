"""The small HTTP/1.1 server for /metrics, /healthz and /readyz, bounded against slow or hostile
clients: a connection limit, a deadline and a size limit on the request head, answers to malformed
input, and a shutdown that does not wait on clients."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from jlm.metrics import HealthState, Metrics

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 100
MAX_HEAD_BYTES = 16 * 1024
HEAD_TIMEOUT = 10.0  # seconds for the whole request head
WRITE_TIMEOUT = 10.0  # seconds for a client to take the answer
STOP_TIMEOUT = 5.0  # seconds for stop() to wait on handlers before it aborts them
MALFORMED_LOG_INTERVAL = 60.0

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
TEXT = "text/plain; charset=utf-8"


class BadRequest(Exception):
    """A request head the server answers with `status` and closes."""

    def __init__(self, status: str, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


@dataclass(frozen=True, slots=True)
class Head:
    method: str
    path: str


def head_end(buf: bytes) -> int:
    """Where the head ends in `buf` (the index after its blank line), or -1."""
    found = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := buf.find(sep)) >= 0]
    return min(found) if found else -1


def parse_head(head: bytes) -> Head:
    """The method and path of a complete request head; BadRequest when it is not HTTP/1.x."""
    lines = head.replace(b"\r\n", b"\n").rstrip(b"\n").split(b"\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _VERSION.fullmatch(parts[2]):
        raise BadRequest("400 Bad Request", "malformed request line")
    target = parts[1]
    if not target.startswith(b"/") or any(c <= 0x20 or c >= 0x7F for c in target):
        raise BadRequest("400 Bad Request", "malformed request target")
    for line in lines[1:]:
        name, colon, _ = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise BadRequest("400 Bad Request", "malformed header line")
    return Head(parts[0].decode("ascii"), target.split(b"?", 1)[0].decode("ascii"))


async def read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The request head, None when the client closed before sending one; BadRequest when it grows
    past MAX_HEAD_BYTES (a request line that long gets 414) or is cut short."""
    buf = b""
    while True:
        end = head_end(buf)
        if end >= 0:
            if end > MAX_HEAD_BYTES:
                raise _too_large(buf)
            return buf[:end]
        if len(buf) > MAX_HEAD_BYTES:
            raise _too_large(buf)
        chunk = await reader.read(4096)
        if not chunk:
            if buf.strip():
                raise BadRequest("400 Bad Request", "request head cut short")
            return None
        buf += chunk


def _too_large(buf: bytes) -> BadRequest:
    if b"\n" not in buf[:MAX_HEAD_BYTES]:
        return BadRequest("414 URI Too Long", "request line over 16 KiB")
    return BadRequest("431 Request Header Fields Too Large", "request head over 16 KiB")


class HttpServer:
    """A minimal HTTP/1.1 server: three GET routes need no framework. One request per
    connection (`Connection: close`)."""

    def __init__(
        self,
        metrics: Metrics,
        health: HealthState,
        host: str,
        port: int,
        on_scrape: Callable[[], None] | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        head_timeout: float = HEAD_TIMEOUT,
    ) -> None:
        self._metrics = metrics
        self._health = health
        self._host = host
        self._port = port
        self._on_scrape = on_scrape
        self._max_connections = max_connections
        self._head_timeout = head_timeout
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._last_malformed_log = -MALFORMED_LOG_INTERVAL

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        return len(self._open)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self._host, self._port, backlog=self._max_connections
        )
        log.info("metrics and health on http://%s:%d", self._host, self.port)

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop accepting, give running answers `timeout` seconds, then abort what is left."""
        if self._server is None:
            return
        self._server.close()
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=timeout)
        for writer in list(self._open):
            writer.transport.abort()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=timeout)
        self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= self._max_connections:
            # Closed at once: an idle crowd cannot hold the port, and /metrics answers as soon
            # as a slot frees.
            writer.transport.abort()
            self._note_malformed(f"over {self._max_connections} connections: closed")
            return
        task = asyncio.current_task()
        assert task is not None
        self._open.add(writer)
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
            writer.close()
        except (TimeoutError, ConnectionError, OSError, asyncio.CancelledError):
            writer.transport.abort()
        finally:
            self._open.discard(writer)
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self._head_timeout):
                raw = await read_head(reader)
            if raw is None:
                return
            head = parse_head(raw)
        except TimeoutError:
            self._note_malformed("request head not complete within the deadline: closed")
            return
        except BadRequest as bad:
            self._note_malformed(bad.why)
            await self._answer(writer, bad.status, TEXT, f"{bad.why}\n".encode())
            return
        status, ctype, body = self._route(head.method, head.path)
        await self._answer(writer, status, ctype, body, send_body=head.method != "HEAD")

    async def _answer(
        self,
        writer: asyncio.StreamWriter,
        status: str,
        ctype: str,
        body: bytes,
        *,
        send_body: bool = True,
    ) -> None:
        """`HEAD` gets the headers `GET` would get (Content-Length included) and no body."""
        allow = "Allow: GET, HEAD\r\n" if status.startswith("405") else ""
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"{allow}Connection: close\r\n\r\n"
        )
        writer.write(head.encode() + (body if send_body else b""))
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()

    def _note_malformed(self, why: str) -> None:
        """Logged at most once a minute: a scanner must not fill the log."""
        t = time.monotonic()
        if t - self._last_malformed_log >= MALFORMED_LOG_INTERVAL:
            self._last_malformed_log = t
            log.warning("http: %s (logged at most once a minute)", why)

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", TEXT, b"method not allowed\n"
        if path == "/metrics":
            if self._on_scrape is not None:
                self._on_scrape()
            self._metrics.ready.set(1 if self._health.ready else 0)
            return "200 OK", CONTENT_TYPE_LATEST, self._metrics.render()
        if path == "/healthz":
            return "200 OK", TEXT, b"ok\n"
        if path == "/readyz":
            detail = "".join(
                f"{name} {'ok' if ok else 'down'}\n"
                for name, ok in sorted(self._health.checks.items())
            ).encode()
            if self._health.ready:
                return "200 OK", TEXT, b"ready\n" + detail
            return "503 Service Unavailable", TEXT, b"not ready\n" + detail
        return "404 Not Found", TEXT, b"not found\n"
