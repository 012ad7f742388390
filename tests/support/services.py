"""The shared Redis and RabbitMQ the tests connect to, and a daemon running in the test process.

Every test gets a fresh vhost on the shared broker and a fresh Redis namespace (tests/conftest.py);
JLM_TEST_REDIS_URL and JLM_TEST_AMQP_BASE point the tests at other servers.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Callable
from typing import Any

import redis

from jlm.config import Settings, load_settings
from jlm.service import Service

REDIS_URL = os.environ.get("JLM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_BASE = os.environ.get("JLM_TEST_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")

_vhost_pool: list[str] = []
vhosts_made: list[str] = []  # made and not yet deleted
_vhosts_done: list[str] = []  # their tests have ended: deleted with the next batch
_made_count = 0
_RUN = uuid.uuid4().hex[:6]
# Every vhost holds its own message stores and a `jlm.provenance` stream, each with open files.
# A broker started the usual way (root -> su rabbitmq) has 1,024 file descriptors: a suite that
# kept all its vhosts to the end ran it out (emfile) and crashed it. Finished tests' vhosts are
# therefore deleted in batches, in the same rabbitmqctl call that makes the next ones.
_BATCH = 20


def rabbit_eval(expr: str) -> None:
    """Evaluate an Erlang expression on the shared broker."""
    subprocess.run(["rabbitmqctl", "eval", expr], check=True, capture_output=True, timeout=60)


def _erl_list(names: list[str]) -> str:
    return "[" + ",".join(f'<<"{name}">>' for name in names) + "]"


def _delete_expr(names: list[str]) -> str:
    return (
        f'lists:foreach(fun(N) -> rabbit_vhost:delete(N, <<"jlm-tests">>) end, {_erl_list(names)})'
    )


def _make_vhosts(n: int, delete: list[str]) -> None:
    global _made_count
    names = [f"jlm-test-{_RUN}-{_made_count + i}" for i in range(n)]
    rabbit_eval(
        f"{_delete_expr(delete)}, "
        f'lists:foreach(fun(N) -> rabbit_vhost:add(N, <<"jlm-tests">>), '
        f'rabbit_auth_backend_internal:set_permissions(<<"guest">>, N, <<".*">>, '
        f'<<".*">>, <<".*">>, <<"jlm-tests">>) end, {_erl_list(names)}).'
    )
    _made_count += n
    for name in delete:
        vhosts_made.remove(name)
    vhosts_made.extend(names)
    _vhost_pool.extend(names)


def fresh_vhost() -> str:
    """A vhost of the shared broker no other test uses (made twenty at a time)."""
    if not _vhost_pool:
        done = _vhosts_done[:]
        _vhosts_done.clear()
        _make_vhosts(_BATCH, done)
    return _vhost_pool.pop(0)


def vhost_done(name: str) -> None:
    """The test that used `name` has ended: delete it with the next batch."""
    _vhosts_done.append(name)


def delete_vhosts() -> None:
    """Delete every vhost this run made and has not deleted yet."""
    if vhosts_made:
        rabbit_eval(_delete_expr(vhosts_made) + ".")
        vhosts_made.clear()
        _vhosts_done.clear()


async def delete_namespace(client: Any, namespace: str) -> None:
    """Delete every key of `namespace` through an async client (a test's own redis-server)."""
    found = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
    if found:
        await client.delete(*found)


def drop_namespace(name: str) -> None:
    """Delete every key of a test's namespace on the shared Redis (no-op where it used another)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        batch = []
        for key in client.scan_iter(match=f"{name}:*", count=2000):
            batch.append(key)
            if len(batch) == 1000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


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
