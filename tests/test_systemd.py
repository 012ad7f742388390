"""sd_notify against a real unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jlm.systemd import Notifier, sanitize_status, watchdog_loop

pytestmark = pytest.mark.unit

pytestmark = pytest.mark.timeout(10)

WATCHDOG = b"WATCHDOG=1"


class Manager:
    """A stand-in for systemd: a bound datagram socket and a thread that timestamps what arrives.

    Receiving on a thread matters for the blocked-loop test: the timestamps must be taken while the
    event loop under test is stuck, so the loop cannot be the one reading.
    """

    def __init__(self, notify_socket: str) -> None:
        self.notify_socket = notify_socket
        address = "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(address)
        self._sock.settimeout(0.02)
        self._received: list[tuple[float, bytes]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-systemd", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            with self._cond:
                self._received.append((time.monotonic(), data))
                self._cond.notify_all()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()

    @property
    def received(self) -> list[tuple[float, bytes]]:
        """(monotonic arrival time, datagram) pairs, in arrival order."""
        with self._cond:
            return list(self._received)

    @property
    def datagrams(self) -> list[bytes]:
        return [data for _, data in self.received]

    def wait_for(self, count: int, timeout: float = 2.0) -> list[bytes]:
        """Block until at least `count` datagrams have arrived; return all of them."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self._received) >= count, timeout), (
                f"expected {count} datagrams, got {[d for _, d in self._received]}"
            )
            return [data for _, data in self._received]

    async def await_for(self, count: int) -> list[bytes]:
        """`wait_for` without blocking the event loop that is doing the sending."""
        return await asyncio.to_thread(self.wait_for, count)


@pytest.fixture
def short_dir() -> Iterator[str]:
    # sun_path is 108 bytes; pytest's tmp_path (with the test name in it) can exceed that.
    path = tempfile.mkdtemp(prefix="jlm-sd-", dir="/tmp" if os.path.isdir("/tmp") else None)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def manager(short_dir: str) -> Iterator[Manager]:
    m = Manager(os.path.join(short_dir, "notify"))
    yield m
    m.close()


@pytest.fixture
def notifier(manager: Manager) -> Iterator[Notifier]:
    with Notifier.from_env({"NOTIFY_SOCKET": manager.notify_socket}) as n:
        yield n


def test_without_notify_socket_everything_is_a_no_op() -> None:
    n = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert n.watchdog_interval is None
    assert n.ready("up") is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n.stopping() is False
    assert n.extend_timeout(5) is False
    n.close()


async def test_watchdog_loop_returns_at_once_when_disabled() -> None:
    async with asyncio.timeout(1):
        await watchdog_loop(Notifier.from_env({}), lambda: True)
        await watchdog_loop(Notifier.from_env({}), lambda: True, interval=0.01)


def test_from_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier.from_env().enabled
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    assert Notifier.from_env().enabled


@pytest.mark.parametrize("value", ["", "relative/path", "@", "vsock:2:1234"])
def test_unsupported_notify_socket_disables(value: str) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert not n.enabled
    assert n.ready() is False


def test_datagrams_arrive_exactly_and_in_order(manager: Manager, notifier: Notifier) -> None:
    assert notifier.enabled
    assert notifier.ready("consuming")
    assert notifier.status("3 jobs running")
    for _ in range(3):
        assert notifier.watchdog()
    assert notifier.extend_timeout(2.5)
    assert notifier.stopping("draining")
    assert notifier.stopping()
    assert manager.wait_for(8) == [
        b"READY=1\nSTATUS=consuming",
        b"STATUS=3 jobs running",
        WATCHDOG,
        WATCHDOG,
        WATCHDOG,
        b"EXTEND_TIMEOUT_USEC=2500000",
        b"STOPPING=1\nSTATUS=draining",
        b"STOPPING=1",
    ]


def test_abstract_socket(short_dir: str) -> None:
    m = Manager(f"@jlm-test-{uuid.uuid4().hex}")
    try:
        with Notifier.from_env({"NOTIFY_SOCKET": m.notify_socket}) as n:
            n.ready()
            n.watchdog()
            n.stopping()
        assert m.wait_for(3) == [b"READY=1", WATCHDOG, b"STOPPING=1"]
    finally:
        m.close()


def test_status_newlines_are_sanitised(manager: Manager, notifier: Notifier) -> None:
    notifier.status("line one\nREADY=1\r\nline\0three")
    notifier.ready("a\nb")
    assert manager.wait_for(2) == [
        b"STATUS=line one READY=1  line three",
        b"READY=1\nSTATUS=a b",
    ]


def test_unencodable_status_does_not_raise(manager: Manager, notifier: Notifier) -> None:
    assert notifier.status("bad \udcff byte")
    assert manager.wait_for(1) == [b"STATUS=bad ? byte"]


@given(st.text())
def test_sanitised_status_is_one_line(text: str) -> None:
    line = f"STATUS={sanitize_status(text)}"
    assert "\n" not in line
    assert "\0" not in line
    assert line.splitlines() == [line]


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}, 0.05),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify", **env})
    assert n.enabled
    assert n.watchdog_interval == interval


@given(st.dictionaries(st.sampled_from(["WATCHDOG_USEC", "WATCHDOG_PID"]), st.text()))
def test_from_env_never_raises_on_odd_watchdog_values(env: dict[str, str]) -> None:
    interval = Notifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify", **env}).watchdog_interval
    assert interval is None or interval > 0


def test_extend_timeout_rejects_nonsense(notifier: Notifier) -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="extend_timeout"):
            notifier.extend_timeout(bad)


def test_vanished_manager_is_not_an_error(short_dir: str) -> None:
    m = Manager(os.path.join(short_dir, "notify"))
    with Notifier.from_env({"NOTIFY_SOCKET": m.notify_socket}) as n:
        assert n.ready()
        m.wait_for(1)
        m.close()
        os.unlink(m.notify_socket)
        assert n.watchdog() is False
        assert n.stopping("bye") is False


def test_full_manager_queue_never_blocks(short_dir: str) -> None:
    path = os.path.join(short_dir, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as deaf:
        deaf.bind(path)  # bound, never read: its queue fills up
        with Notifier.from_env({"NOTIFY_SOCKET": path}) as n:
            started = time.monotonic()
            results = [n.watchdog() for _ in range(5000)]
            assert time.monotonic() - started < 2
    assert results[0] is True
    assert results[-1] is False  # dropped once full, instead of blocking


async def test_watchdog_loop_pings_periodically(manager: Manager) -> None:
    env = {"NOTIFY_SOCKET": manager.notify_socket, "WATCHDOG_USEC": "100000"}
    with Notifier.from_env(env) as n:
        assert n.watchdog_interval == 0.05
        task = asyncio.create_task(watchdog_loop(n, lambda: True))
        try:
            await manager.await_for(5)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    times = [t for t, data in manager.received if data == WATCHDOG]
    assert len(times) >= 5
    assert set(manager.datagrams) == {WATCHDOG}
    # Periodic, not a burst: four gaps of ~0.05 s.
    assert times[4] - times[0] >= 0.15


async def test_watchdog_loop_withholds_pings_while_unhealthy(
    manager: Manager, notifier: Notifier
) -> None:
    healthy = True
    task = asyncio.create_task(watchdog_loop(notifier, lambda: healthy, interval=0.02))
    try:
        await manager.await_for(3)
        healthy = False
        await asyncio.sleep(0.05)  # let a ping already in flight land
        count = len(manager.received)
        await asyncio.sleep(0.3)
        assert len(manager.received) == count
        healthy = True
        await manager.await_for(count + 3)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_failing_health_check_withholds_pings(manager: Manager, notifier: Notifier) -> None:
    calls = 0

    def flaky() -> bool:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise RuntimeError("redis went away")
        return True

    task = asyncio.create_task(watchdog_loop(notifier, flaky, interval=0.02))
    try:
        await manager.await_for(2)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert calls >= 5  # the exceptions did not end the loop


async def test_blocked_event_loop_stops_pings(manager: Manager, notifier: Notifier) -> None:
    task = asyncio.create_task(watchdog_loop(notifier, lambda: True, interval=0.05))
    try:
        await manager.await_for(3)

        async def hog() -> tuple[float, float]:
            started = time.monotonic()
            time.sleep(0.5)  # noqa: ASYNC251 - blocking the loop is the point of this test
            return started, time.monotonic()

        block_start, block_end = await hog()
        before = len(manager.received)
        await manager.await_for(before + 2)  # pings resume once the loop is free
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    times = [t for t, _ in manager.received]
    # A ping sent just before the block may be read by the receiver thread a moment into it.
    during = [t for t in times if block_start + 0.05 < t < block_end]
    assert during == [], f"pings arrived while the loop was blocked: {during}"
    assert any(t < block_start for t in times)
    assert any(t >= block_end for t in times)
    assert max(b - a for a, b in itertools.pairwise(times)) >= 0.45


def test_subprocess_notifies_in_order(manager: Manager) -> None:
    script = textwrap.dedent(
        """
        from jlm.systemd import Notifier
        with Notifier.from_env() as n:
            assert n.enabled
            assert n.watchdog_interval is None
            assert n.ready("child up")
            assert n.stopping()
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
    env["NOTIFY_SOCKET"] = manager.notify_socket
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=8,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert manager.wait_for(2) == [b"READY=1\nSTATUS=child up", b"STOPPING=1"]


def test_subprocess_ignores_a_watchdog_meant_for_its_parent(manager: Manager) -> None:
    script = textwrap.dedent(
        """
        from jlm.systemd import Notifier
        with Notifier.from_env() as n:
            print(n.watchdog_interval)
        """
    )
    env = dict(os.environ)
    env.update(
        NOTIFY_SOCKET=manager.notify_socket, WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getpid())
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=8,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None"
