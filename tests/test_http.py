"""The metrics and health HTTP server under slow, crowded and malformed clients."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.support.daemon import DaemonProcess

from jlm.config import Settings
from jlm.http_server import MAX_HEAD_BYTES, BadRequest, HttpServer, head_end, parse_head
from jlm.metrics import HealthState, Metrics


def exchange(port: int, raw: bytes, timeout: float = 5.0) -> bytes:
    """Send `raw`, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def split_answer(answer: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    fields = dict(
        line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ": " in line
    )
    return {k.lower(): v for k, v in fields.items()}, body


def closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# -- the request head parser ---------------------------------------------------------------------


@pytest.mark.unit
@given(
    method=st.sampled_from(["GET", "HEAD", "POST", "PROPFIND"]),
    path=st.from_regex(r"/[a-z0-9/._-]{0,30}(\?[a-z=&0-9]{0,20})?", fullmatch=True),
    headers=st.lists(
        st.tuples(
            st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True),
            st.from_regex(r"[ -~]{0,40}", fullmatch=True),
        ),
        max_size=8,
    ),
    crlf=st.booleans(),
)
def test_a_well_formed_head_parses(
    method: str, path: str, headers: list[tuple[str, str]], crlf: bool
) -> None:
    eol = "\r\n" if crlf else "\n"
    raw = f"{method} {path} HTTP/1.1{eol}" + "".join(f"{k}: {v}{eol}" for k, v in headers) + eol
    data = raw.encode()
    assert head_end(data) == len(data)
    head = parse_head(data)
    assert (head.method, head.path) == (method, path.split("?", maxsplit=1)[0])


@pytest.mark.unit
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_a_bad_request(data: bytes) -> None:
    try:
        parse_head(data)
    except BadRequest as bad:
        assert bad.status == "400 Bad Request"


@pytest.mark.unit
@pytest.mark.parametrize(
    "raw",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n",  # a TLS hello
        b"GET\n\n",
        b"GET /metrics\n\n",
        b"GET metrics HTTP/1.1\n\n",
        b"GET /metrics HTTP/2.0\n\n",
        b"GET /met rics HTTP/1.1\n\n",
        b"GET /metrics HTTP/1.1\nno colon here\n\n",
        b"G(T /metrics HTTP/1.1\n\n",
    ],
)
def test_malformed_heads_are_400(raw: bytes) -> None:
    with pytest.raises(BadRequest) as bad:
        parse_head(raw)
    assert bad.value.status == "400 Bad Request"


# -- the daemon's server, as a process -----------------------------------------------------------


@pytest.fixture
def daemon_proc(
    settings: Settings, tmp_path: Path
) -> Iterator[tuple[DaemonProcess, Iterator[str]]]:
    with DaemonProcess.of(settings, tmp_path) as proc:
        proc.wait_ready_blocking()

        def lines() -> Iterator[str]:
            yield from proc.log_text().splitlines()

        yield proc, lines()
        assert proc.terminate_blocking() == 0
    text = proc.log_text()
    assert "Traceback" not in text, text[-3000:]


@pytest.mark.timeout(60)
def test_crowd_of_idle_connections_and_hostile_requests(
    daemon_proc: tuple[DaemonProcess, Iterator[str]],
) -> None:
    proc, _ = daemon_proc
    port = proc.port
    assert port is not None
    idle = []
    try:
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            idle.append(s)
        # The server holds 100 and closes every one past that at once.
        time.sleep(1.0)
        for s in idle:
            s.settimeout(0.05)
        closed = [s for s in idle if closed_by_peer(s)]
        assert len(closed) == 50, f"{len(closed)} of 150 idle connections closed by the server"
        held = [s for s in idle if s not in closed]
        assert all(s.fileno() >= 0 for s in held)
        # While the 100 are held, a new client is closed too (and does not hang).
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            extra.settimeout(5)
            assert closed_by_peer(extra)
    finally:
        for s in idle:
            s.close()
    # Once they are gone, /metrics answers a new client within a second.
    time.sleep(0.2)
    answer = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", timeout=1.0)
    assert status_of(answer) == 200
    assert b"process_resident_memory_bytes" in answer
    assert b"process_open_fds" in answer
    assert b"python_info" in answer

    big_header = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 20 * 1024 + b"\r\n\r\n"
    assert status_of(exchange(port, big_header)) == 431
    many_headers = b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 3000 + b"\r\n"
    assert status_of(exchange(port, many_headers)) == 431
    long_line = b"GET /" + b"a" * 70 * 1024 + b" HTTP/1.1\r\n\r\n"
    assert status_of(exchange(port, long_line)) in (414, 431)
    assert status_of(exchange(port, b"\x00\xff garbage \x01\r\n\r\n")) == 400
    assert status_of(exchange(port, b"POST /metrics HTTP/1.1\r\n\r\n")) == 405

    _get_head, get_body = split_answer(exchange(port, b"GET /readyz HTTP/1.1\r\n\r\n"))
    head_head, head_body = split_answer(exchange(port, b"HEAD /readyz HTTP/1.1\r\n\r\n"))
    assert head_body == b""
    assert int(head_head["content-length"]) == len(get_body) > 0
    metrics_head, metrics_body = split_answer(exchange(port, b"HEAD /metrics HTTP/1.1\r\n\r\n"))
    assert metrics_body == b""
    assert int(metrics_head["content-length"]) > 1000


def test_malformed_requests_are_logged_at_most_once_a_minute(
    daemon_proc: tuple[DaemonProcess, Iterator[str]],
) -> None:
    proc, lines = daemon_proc
    assert proc.port is not None
    for _ in range(20):
        assert status_of(exchange(proc.port, b"garbage\r\n\r\n")) == 400
    assert status_of(exchange(proc.port, b"GET /healthz HTTP/1.1\r\n\r\n")) == 200
    noted = [line for line in lines if "http: " in line]
    assert len(noted) == 1, noted


# -- deadlines, in process -----------------------------------------------------------------------


@pytest.mark.unit
async def test_a_slow_head_is_closed_at_the_deadline_and_stop_is_bounded() -> None:
    server = HttpServer(Metrics(), HealthState(), "127.0.0.1", 0, head_timeout=0.5)
    await server.start()
    try:
        # Slowloris: one byte at a time, never finishing the head.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")
        await writer.drain()
        for _ in range(3):
            await asyncio.sleep(0.2)
            writer.write(b"X")
            await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # An idle client does not hold stop() back.
        _, idle = await asyncio.open_connection("127.0.0.1", server.port)
        await asyncio.sleep(0.1)
        assert server.connections == 1
    finally:
        await asyncio.wait_for(server.stop(timeout=0.2), 5)
    assert server.connections == 0
    idle.close()


@pytest.mark.unit
async def test_the_head_limit_is_16_kib() -> None:
    server = HttpServer(Metrics(), HealthState(), "127.0.0.1", 0)
    await server.start()
    try:
        line = b"GET /healthz HTTP/1.1\r\n"
        fits = line + b"X-Pad: " + b"a" * (MAX_HEAD_BYTES - len(line) - 11) + b"\r\n\r\n"
        assert len(fits) == MAX_HEAD_BYTES
        over = line + b"X-Pad: " + b"a" * (MAX_HEAD_BYTES - len(line) - 10) + b"\r\n\r\n"
        answers = []
        for raw in (fits, over):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(raw)
            answers.append(await asyncio.wait_for(reader.read(), 5))
            writer.close()
        assert [status_of(a) for a in answers] == [200, 431]
    finally:
        await server.stop()
