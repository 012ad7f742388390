"""Shared fixtures: real Redis and RabbitMQ, a fresh vhost and Redis namespace per test."""

from __future__ import annotations

import gc
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as aioredis
from tests.support.redis_server import RedisServer
from tests.support.services import (
    REDIS_URL,
    RunningDaemon,
    delete_vhosts,
    drop_namespace,
    fresh_vhost,
    settings_factory,
    start_daemon,
    vhost_done,
)

from jlm.client import Client
from jlm.config import Settings


@pytest.fixture(scope="session", autouse=True)
def _cleanup_vhosts() -> Iterator[None]:
    yield
    delete_vhosts()


@pytest.fixture(scope="module", autouse=True)
def _collect_garbage_per_module() -> Iterator[None]:
    """Collect the module's garbage when it ends: a connection it left unclosed is reported
    (pyproject.toml's filterwarnings) under its own last test, not a later module's."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of the module's own, for property tests that read back or delete every key of an
    example: a SCAN of the shared server walks whatever the rest of the suite left there."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def vhost() -> Iterator[str]:
    name = fresh_vhost()
    yield name
    vhost_done(name)


@pytest.fixture
def namespace() -> Iterator[str]:
    """A fresh Redis namespace, deleted from the shared Redis after the test (its daemons are
    stopped first): the keyspace that other tests SCAN stays the size of one test's."""
    name = f"jlmt{uuid.uuid4().hex[:10]}"
    yield name
    drop_namespace(name)


@pytest.fixture
def make_settings(vhost: str, namespace: str) -> Callable[..., Settings]:
    return settings_factory(vhost, namespace)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
async def redis_client(namespace: str) -> AsyncIterator[aioredis.Redis]:
    """The shared Redis; the test's namespace outlives this client and is deleted after it."""
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def daemon(settings: Settings) -> AsyncIterator[RunningDaemon]:
    running = await start_daemon(settings)
    yield running
    await running.stop()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with Client(settings) as c:
        yield c
