"""Fixtures of the fault suite: daemon processes, own server instances, the ledger summary."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from tests.conftest import AMQP_BASE, REDIS_URL
from tests.faults.daemons import DaemonProcess, daemon_env
from tests.faults.ledger import LINES
from tests.faults.proxy import Proxy
from tests.faults.servers import RedisServer


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if LINES:
        terminalreporter.section("fault suite accounting")
        for line in LINES:
            terminalreporter.write_line(line)


@pytest.fixture
def amqp_url(vhost: str) -> str:
    return f"{AMQP_BASE}/{vhost}"


@pytest.fixture
async def shared_redis(namespace: str) -> AsyncIterator[aioredis.Redis]:
    """The machine's Redis, used read-mostly under this test's own namespace; cleaned after."""
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=2000)]
    for i in range(0, len(keys), 1000):
        await client.delete(*keys[i : i + 1000])
    await client.aclose()


DaemonFactory = Callable[..., DaemonProcess]


@pytest.fixture
def spawn(tmp_path: Path, namespace: str) -> Iterator[DaemonFactory]:
    """Make daemon processes (not yet started); every one still running is killed at the end."""
    made: list[DaemonProcess] = []

    def make(
        name: str, amqp_url: str, redis_url: str = REDIS_URL, module: str = "jlm", **env: str
    ) -> DaemonProcess:
        d = DaemonProcess(
            name, daemon_env(amqp_url, redis_url, namespace, **env), tmp_path, module=module
        )
        made.append(d)
        return d

    yield make
    for d in made:
        d.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start redis-server instances owned by the test (killed at the end)."""
    made: list[RedisServer] = []

    def make(name: str = "redis", *, aof: bool = False) -> RedisServer:
        server = RedisServer(tmp_path / name, aof=aof).start()
        made.append(server)
        return server

    yield make
    for server in made:
        with contextlib.suppress(Exception):
            server.stop()


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    """A TCP proxy in front of the shared broker (127.0.0.1:5672)."""
    p = await Proxy("127.0.0.1", 5672).start()
    yield p
    await p.close()
