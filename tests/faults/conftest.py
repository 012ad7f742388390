"""Fixtures of the fault suite: daemon processes, own server instances, the ledger summary."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from tests.faults.proxy import Proxy
from tests.support.daemon import DaemonProcess, daemon_env
from tests.support.ledger import LINES
from tests.support.redis_server import RedisClusterServers, RedisServer
from tests.support.services import AMQP_BASE, REDIS_URL, settings_factory

from jlm.config import Settings


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
    """The machine's Redis, used read-mostly under this test's own namespace (which the
    `namespace` fixture deletes after the test)."""
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
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
        # Shown by pytest for a failing test only ("Captured stdout teardown").
        print(f"--- daemon {d.name}, last lines of its log\n{d.tail(60)}")


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
            server.kill()


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    """A TCP proxy in front of the shared broker (127.0.0.1:5672)."""
    p = await Proxy("127.0.0.1", 5672).start()
    yield p
    await p.close()


# -- a 3-master Redis Cluster per module -------------------------------------------------------
# A module runs its tests against it by overriding `make_settings` and `redis_client` with
# `cluster_settings` and `cluster_redis` (tests/faults/test_fault_redis_cluster.py).


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """Three masters on loopback, created for the module and killed after it."""
    servers = RedisClusterServers(Path(tmp_path_factory.mktemp("redis-cluster")))
    try:
        yield servers.start()
    finally:
        servers.stop()


@pytest.fixture
def cluster_settings(
    vhost: str, namespace: str, cluster: RedisClusterServers
) -> Callable[..., Settings]:
    """Settings with JLM_REDIS_CLUSTER=true and JLM_REDIS_URL naming the cluster's first node."""
    return settings_factory(vhost, namespace, JLM_REDIS_URL=cluster.url, JLM_REDIS_CLUSTER="true")


@pytest.fixture
async def cluster_redis(
    cluster: RedisClusterServers, namespace: str
) -> AsyncIterator[RedisCluster]:
    """A cluster client; the test's namespace is deleted from every master after the test."""
    client = RedisCluster.from_url(cluster.url)
    yield client
    keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
    for key in keys:
        await client.delete(key)
    await client.aclose()
