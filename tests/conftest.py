"""Shared fixtures: real Redis and RabbitMQ, a fresh vhost and Redis namespace per test."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from jlm.client import Client
from jlm.config import Settings, load_settings
from jlm.service import Service

REDIS_URL = os.environ.get("JLM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_BASE = os.environ.get("JLM_TEST_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")

_vhost_pool: list[str] = []
_vhosts_live: list[str] = []  # made and not yet deleted
_vhosts_done: list[str] = []  # their tests have ended: deleted in the next batch
_RUN = uuid.uuid4().hex[:6]
# Every vhost holds its own message stores and a `jlm.provenance` stream, each with open files.
# A broker started the usual way (root -> su rabbitmq) has 1,024 file descriptors: a suite that
# kept all its vhosts to the end would run it out (emfile) and crash it. Finished tests' vhosts
# are therefore deleted in batches, in the same rabbitmqctl call that makes the next ones.
_BATCH = 20


def rabbit_eval(expr: str) -> None:
    subprocess.run(["rabbitmqctl", "eval", expr], check=True, capture_output=True, timeout=60)


def _erl_list(names: list[str]) -> str:
    return "[" + ",".join(f'<<"{name}">>' for name in names) + "]"


def _make_vhosts(n: int, delete: list[str]) -> None:
    names = [f"jlm-test-{_RUN}-{len(_vhosts_live) + len(_vhosts_done) + i}" for i in range(n)]
    rabbit_eval(
        f'lists:foreach(fun(N) -> rabbit_vhost:delete(N, <<"jlm-tests">>) end, '
        f"{_erl_list(delete)}), "
        f'lists:foreach(fun(N) -> rabbit_vhost:add(N, <<"jlm-tests">>), '
        f'rabbit_auth_backend_internal:set_permissions(<<"guest">>, N, <<".*">>, '
        f'<<".*">>, <<".*">>, <<"jlm-tests">>) end, {_erl_list(names)}).'
    )
    for name in delete:
        _vhosts_live.remove(name)
    _vhosts_live.extend(names)
    _vhost_pool.extend(names)


def fresh_vhost() -> str:
    if not _vhost_pool:
        done = _vhosts_done[:]
        _vhosts_done.clear()
        _make_vhosts(_BATCH, done)
    return _vhost_pool.pop(0)


@pytest.fixture(scope="session", autouse=True)
def _cleanup_vhosts() -> Iterator[None]:
    yield
    if _vhosts_live:
        rabbit_eval(
            f'lists:foreach(fun(N) -> rabbit_vhost:delete(N, <<"jlm-tests">>) end, '
            f"{_erl_list(_vhosts_live)})."
        )


@pytest.fixture
def vhost() -> Iterator[str]:
    name = fresh_vhost()
    yield name
    _vhosts_done.append(name)


@pytest.fixture
def namespace() -> str:
    return f"jlmt{uuid.uuid4().hex[:10]}"


def settings_factory(vhost: str, namespace: str, **fixed: str) -> Callable[..., Settings]:
    """Settings for a test's vhost and namespace; `fixed`, then each call's arguments, override."""

    def make(**env: str) -> Settings:
        base = {
            "JLM_AMQP_URL": f"{AMQP_BASE}/{vhost}",
            "JLM_REDIS_URL": REDIS_URL,
            "JLM_REDIS_NAMESPACE": namespace,
            "JLM_METRICS_ADDR": "127.0.0.1:0",
            "JLM_SHUTDOWN_TIMEOUT": "10",
            **fixed,
        }
        base.update(env)
        return load_settings(base)

    return make


@pytest.fixture
def make_settings(vhost: str, namespace: str) -> Callable[..., Settings]:
    return settings_factory(vhost, namespace)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
async def redis_client(namespace: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


class RunningDaemon:
    """A Service running in this process, on its own task."""

    def __init__(self, service: Service, task: asyncio.Task[None]) -> None:
        self.service = service
        self.task = task

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.service.http.port}"

    async def stop(self) -> None:
        self.service.stop()
        await asyncio.wait_for(self.task, 30)


async def start_daemon(settings: Settings, **kwargs: Any) -> RunningDaemon:
    service = Service(settings, **kwargs)
    task = asyncio.create_task(service.run(handle_signals=False))
    started = asyncio.create_task(service.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    assert started in done, "daemon did not start consuming within 20 s"
    return RunningDaemon(service, task)


@pytest.fixture
async def daemon(settings: Settings) -> AsyncIterator[RunningDaemon]:
    running = await start_daemon(settings)
    yield running
    await running.stop()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with Client(settings) as c:
        yield c
