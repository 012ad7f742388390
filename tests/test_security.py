"""Security against the real servers: authorisation, TLS, secrets, least privilege, limits.

Broker users are created per test on the shared broker's per-test vhost (names unique to the run)
and deleted afterwards. Redis with TLS and ACL users, and a RabbitMQ node with a TLS listener, are
started by this module on free loopback ports; the machine's own servers are never reconfigured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aiormq.exceptions import ChannelAccessRefused, ChannelPreconditionFailed
from redis.exceptions import NoPermissionError, ResponseError
from tests.amqp_helpers import drain_queue, events_on, read_stream
from tests.security_helpers import (
    DAEMON_GRANTS,
    PUBLISHER_GRANTS,
    WORKER_GRANTS,
    BrokerUser,
    add_shared_users,
    amqp_connect,
    close_user_connections,
    daemon_acl,
    delete_shared_users,
    erl_bin,
    new_user,
    user_setup_expr,
)
from tests.support.daemon import DaemonProcess
from tests.support.pki import Pki, make_pki, secret
from tests.support.rabbit_node import RabbitNode
from tests.support.redis_server import RedisServer
from tests.support.requests import request_message
from tests.support.services import AMQP_BASE, start_daemon

from jlm.client import Client
from jlm.config import ConfigError, Settings, UserGrant, load_settings, redact_url
from jlm.keys import Keys, scope_tag

SHARED_HOST = AMQP_BASE.rpartition("@")[2]  # 127.0.0.1:5672
UNKNOWN_JOB = "0123456789-" + "0" * 32  # well-formed, never created
ROOT = Path(__file__).resolve().parent.parent


def manage(job_type: str, cache_prefix: str, **fields: Any) -> dict[str, Any]:
    return {"job_type": job_type, "cache_prefix": cache_prefix, "payload": {"n": 1}} | fields


def scope_keys(namespace: str, cache_prefix: str, job_type: str) -> tuple[str, str]:
    keys, tag = Keys(namespace), scope_tag(cache_prefix, job_type)
    return keys.scope(tag, cache_prefix, job_type), keys.result(tag, cache_prefix, job_type)


@contextlib.asynccontextmanager
async def client_as(settings: Settings) -> AsyncIterator[Client]:
    async with Client(settings) as c:
        yield c


# =================================================================================================
# 1. Authorisation: a publisher acts only inside its grants
# =================================================================================================


@pytest.mark.unit
@pytest.mark.parametrize(
    ("name", "globs", "expected"),
    [
        ("tenant-a", ("tenant-a", "tenant-a-*"), True),
        ("tenant-a-eu", ("tenant-a", "tenant-a-*"), True),
        ("tenant-ab", ("tenant-a", "tenant-a-*"), False),  # a glob matches the whole name
        ("xtenant-a-1", ("tenant-a-*",), False),  # ... from its start
        ("tenant-a-eu.x", ("tenant-a-?u",), False),  # ... to its end
        ("TENANT-A", ("tenant-a",), False),  # case-sensitive
        ("tenant-a1", ("tenant-a[0-9]",), True),
        ("tenant-b", (), False),  # no grant, no access
    ],
)
def test_grant_globs_match_whole_names(name: str, globs: tuple[str, ...], expected: bool) -> None:
    grant = UserGrant(prefixes=globs, job_types=("*",), operations=("*",))
    assert grant.allows("manage", name, "report.render") is expected
    by_type = UserGrant(prefixes=("*",), job_types=globs, operations=("manage",))
    assert by_type.allows("manage", "p", name) is expected
    assert by_type.allows("cancel", "p", "tenant-a") is False  # operations are granted too


AUTH_TOML = """
[auth]
enabled = true

[auth.users."{a}"]
prefixes = ["tenant-a", "tenant-a-*"]
job_types = ["*"]
operations = ["manage", "cancel", "status", "invalidate", "result"]

[auth.users."{b}"]
prefixes = ["tenant-b"]
job_types = ["report.*"]
operations = ["*"]

[auth.users."{r}"]
prefixes = ["tenant-b"]
job_types = ["report.*"]
operations = ["status", "result"]
"""


@dataclass
class AuthSetup:
    """Publishers A, B and a read-only R on the test's vhost, and the daemon's auth settings."""

    users: dict[str, BrokerUser]
    settings: Settings
    namespace: str
    vhost: str
    make_settings: Callable[..., Settings]

    def as_user(self, user: BrokerUser) -> Settings:
        return self.make_settings(JLM_AMQP_URL=user.url(SHARED_HOST, self.vhost))


@pytest.fixture
def auth(
    make_settings: Callable[..., Settings], vhost: str, namespace: str, tmp_path: Path
) -> Iterator[AuthSetup]:
    users = {label: new_user(f"pub-{label}", **PUBLISHER_GRANTS) for label in ("a", "b", "r")}
    config = tmp_path / "auth.toml"
    config.write_text(AUTH_TOML.format(**{k: u.name for k, u in users.items()}))
    add_shared_users(list(users.values()), vhost)
    yield AuthSetup(users, make_settings(JLM_CONFIG=str(config)), namespace, vhost, make_settings)
    delete_shared_users(list(users.values()))


async def snapshot(redis: aioredis.Redis, namespace: str) -> dict[str, Any]:
    """Every key of the namespace with its type, value and TTL, once the daemon's "published"
    marks have landed: a request record gets its `ok` a moment after the reply (written in
    batches), which a snapshot taken right after a reply would otherwise race."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        records = [key async for key in redis.scan_iter(match=f"{namespace}:*:req:*", count=1000)]
        marks = [await redis.hexists(key, "ok") for key in records]
        if all(marks):
            break
        await asyncio.sleep(0.05)
    out: dict[str, Any] = {}
    async for key in redis.scan_iter(match=f"{namespace}:*", count=1000):
        kind = bytes(await redis.type(key)).decode()
        if kind == "hash":
            value: Any = await redis.hgetall(key)
        elif kind == "list":
            value = await redis.lrange(key, 0, -1)
        elif kind == "set":
            value = await redis.smembers(key)
        else:
            value = await redis.get(key)
        out[key.decode()] = (kind, value, await redis.ttl(key) > 0)
    return out


async def test_publisher_cannot_touch_another_publishers_scope(
    auth: AuthSetup, redis_client: aioredis.Redis
) -> None:
    a, b, r = auth.users["a"], auth.users["b"], auth.users["r"]
    settings, namespace = auth.settings, auth.namespace
    running = await start_daemon(settings)
    try:
        async with (
            client_as(auth.as_user(a)) as ca,
            client_as(auth.as_user(b)) as cb,
            client_as(auth.as_user(r)) as cr,
            client_as(settings) as guest,
        ):
            # B's scope: a pending job and a cached result (as a worker writes it).
            job_b = await cb.call("manage", manage("report.render", "tenant-b"), user_id=b.name)
            assert job_b["success"] is True, job_b
            jb = job_b["new_job_id"]
            scope_key, result_key = scope_keys(namespace, "tenant-b", "report.render")
            await redis_client.hset(
                result_key,
                mapping={"job": jb, "value": orjson.dumps({"pages": 3}), "at": "t"},
            )
            await redis_client.expire(result_key, 3600)
            before = await snapshot(redis_client, namespace)
            assert scope_key in before
            assert result_key in before

            attempts: list[tuple[Client, str | None, str, dict[str, Any]]] = [
                # A tries to supersede, cancel, read and invalidate in B's scope.
                (ca, a.name, "manage", manage("report.render", "tenant-b")),
                (ca, a.name, "manage", manage("report.render", "tenant-b", cancel_running=True)),
                (ca, a.name, "manage", manage("report.render", "tenant-b", policy="reuse")),
                (ca, a.name, "cancel", {"job_id": jb}),
                (ca, a.name, "cancel", {"job_id": jb, "running": True}),
                (ca, a.name, "status", {"job_id": jb}),
                (ca, a.name, "result", {"job_type": "report.render", "cache_prefix": "tenant-b"}),
                (
                    ca,
                    a.name,
                    "invalidate",
                    {"job_type": "report.render", "cache_prefix": "tenant-b"},
                ),
                # Globs match whole names: not a prefix match, not a substring match.
                (ca, a.name, "manage", manage("report.render", "tenant-ab")),
                (ca, a.name, "manage", manage("report.render", "xtenant-a-1")),
                (cb, b.name, "manage", manage("report.render", "tenant-b-eu")),
                (cb, b.name, "manage", manage("export.report", "tenant-b")),
                # R may read B's scope but not change it.
                (cr, r.name, "manage", manage("report.render", "tenant-b")),
                (cr, r.name, "cancel", {"job_id": jb}),
                (
                    cr,
                    r.name,
                    "invalidate",
                    {"job_type": "report.render", "cache_prefix": "tenant-b"},
                ),
                # No user_id, and a broker user without any grant.
                (ca, None, "manage", manage("report.render", "tenant-a")),
                (ca, None, "status", {"job_id": jb}),
                (cb, None, "invalidate", {"job_type": "report.render", "cache_prefix": "tenant-b"}),
                (guest, "guest", "manage", manage("report.render", "tenant-a")),
                # Without the operation's grant, even a job that does not exist is forbidden
                # (not not_found): no Redis read, and no oracle of which job ids exist.
                (guest, "guest", "status", {"job_id": UNKNOWN_JOB}),
                (cr, r.name, "cancel", {"job_id": UNKNOWN_JOB}),
            ]
            sent: dict[str, tuple[str | None, str, bytes]] = {}
            for i, (client, user, op, body) in enumerate(attempts):
                rid = f"forbidden-{i}"
                raw = orjson.dumps(body)
                sent[rid] = (user, op, raw)
                reply = await client.call(op, raw, message_id=rid, user_id=user)
                assert reply["success"] is False, (i, op, body, reply)
                assert reply["error"]["code"] == "forbidden", (i, op, body, reply)

            # B's job and cached result are exactly as they were; no job was enqueued.
            assert await snapshot(redis_client, namespace) == before
            assert (await redis_client.hget(Keys(namespace).job(jb), "state")) == b"pending"
            jobs = await drain_queue(settings, "jlm.jobs.report.render")
            assert [m.message_id for m in jobs] == [jb]

            # Each attempt is dead-lettered, body intact, with the reason.
            dead = {m.message_id: m for m in await drain_queue(settings, "jlm.dead")}
            assert set(dead) == set(sent)
            for rid, (_user, op, raw) in sent.items():
                assert dead[rid].body == raw
                assert dead[rid].headers["x-jlm-error"] == "forbidden"
                assert dead[rid].headers["x-jlm-operation"] == op
            # ... and recorded as a request.rejected event naming the actor.
            stream = await read_stream(settings)
            events = {e["request_id"]: e for e in stream}
            for rid, (user, _op, _raw) in sent.items():
                assert events[rid]["type"] == "request.rejected"
                assert events[rid]["status"] == "rejected"
                assert events[rid]["actor"] == user
                assert events[rid]["metadata"]["output"]["error"]["code"] == "forbidden"
            by_pid = {e["provenance_id"]: e for e in stream}
            assert by_pid[job_b["provenance_id"]]["actor"] == b.name
            m = running.service.metrics
            assert m.dead_lettered.labels(code="forbidden")._value.get() == len(attempts)

            # The owners still see and use their scopes; R may read.
            status = await cb.call("status", {"job_id": jb}, user_id=b.name)
            assert status["state"] == "pending"
            cached = await cr.call(
                "result", {"job_type": "report.render", "cache_prefix": "tenant-b"}, user_id=r.name
            )
            assert cached["cached"] is True
            assert cached["result"] == {"pages": 3}
            assert (await cr.call("status", {"job_id": jb}, user_id=r.name))["success"] is True
            for prefix in ("tenant-a", "tenant-a-eu"):
                mine = await ca.call("manage", manage("report.render", prefix), user_id=a.name)
                assert mine["success"] is True, mine
            own = await ca.call("cancel", {"job_id": mine["new_job_id"]}, user_id=a.name)
            assert own["cancelled"] is True
            dropped = await cb.call(
                "invalidate",
                {"job_type": "report.render", "cache_prefix": "tenant-b"},
                user_id=b.name,
            )
            assert dropped["cache_invalidated"] is True
    finally:
        await running.stop()


async def test_broker_refuses_a_forged_user_id(
    auth: AuthSetup, redis_client: aioredis.Redis
) -> None:
    a, b = auth.users["a"], auth.users["b"]
    settings, namespace = auth.settings, auth.namespace
    running = await start_daemon(settings)
    try:
        async with client_as(auth.as_user(b)) as cb:
            job_b = await cb.call("manage", manage("report.render", "tenant-b"), user_id=b.name)
        before = await snapshot(redis_client, namespace)
        # A, connected as itself, claims to be B: RabbitMQ closes the channel (406) and the
        # request never reaches the daemon.
        conn = await aio_pika.connect(a.url(SHARED_HOST, auth.vhost))
        async with conn:
            ch = await conn.channel(publisher_confirms=True)
            exchange = await ch.get_exchange("jlm.requests", ensure=False)
            forged = request_message(
                {"job_id": job_b["new_job_id"], "running": True},
                message_id="forged-1",
                user_id=b.name,
                persistent=False,
            )
            with pytest.raises(ChannelPreconditionFailed, match="user_id"):
                await exchange.publish(forged, routing_key="cancel")
        await asyncio.sleep(0.5)
        assert await snapshot(redis_client, namespace) == before
        events = await read_stream(settings)
        assert "forged-1" not in {e["request_id"] for e in events}
        assert await drain_queue(settings, "jlm.dead", timeout=0.5) == []
    finally:
        await running.stop()


# =================================================================================================
# 5. Least privilege on the broker: publishers, workers
# =================================================================================================


async def expect_refused(action: Callable[[AbstractConnection], Any], url: str) -> str:
    """Run `action` on a fresh connection; return the broker's ACCESS_REFUSED text."""
    conn = await aio_pika.connect(url)
    async with conn:
        with pytest.raises(ChannelAccessRefused) as info:
            await action(conn)
    return str(info.value)


async def test_publisher_and_worker_hold_only_their_permissions(
    make_settings: Callable[..., Settings],
    settings: Settings,
    vhost: str,
) -> None:
    pub = new_user("publisher", **PUBLISHER_GRANTS)
    worker = new_user("worker", **WORKER_GRANTS)
    add_shared_users([pub, worker], vhost)
    running = await start_daemon(settings)
    try:
        pub_url, worker_url = pub.url(SHARED_HOST, vhost), worker.url(SHARED_HOST, vhost)
        # The publisher sends requests and gets its replies (on its amq.gen-* reply queue).
        async with client_as(make_settings(JLM_AMQP_URL=pub_url)) as client:
            reply = await client.call("manage", manage("demo", "lp"), user_id=pub.name)
            assert reply["success"] is True, reply
            status = await client.call("status", {"job_id": reply["new_job_id"]})
            assert status["state"] == "pending"

        def publish_to(exchange: str, key: str) -> Callable[[AbstractConnection], Any]:
            async def act(conn: AbstractConnection) -> None:
                ch = await conn.channel(publisher_confirms=True)
                x = await ch.get_exchange(exchange, ensure=False)
                await x.publish(aio_pika.Message(b"{}"), routing_key=key)

            return act

        def consume_from(queue: str) -> Callable[[AbstractConnection], Any]:
            async def act(conn: AbstractConnection) -> None:
                ch = await conn.channel()
                q = await ch.get_queue(queue, ensure=False)

                async def ack(message: AbstractIncomingMessage) -> None:
                    await message.ack()

                await q.consume(ack)

            return act

        def declare(queue: str) -> Callable[[AbstractConnection], Any]:
            async def act(conn: AbstractConnection) -> None:
                ch = await conn.channel()
                await ch.declare_queue(queue, durable=True)

            return act

        # The publisher cannot place jobs or events, read job queues, or declare anything.
        assert "jlm.jobs" in await expect_refused(publish_to("jlm.jobs", "demo"), pub_url)
        assert "jlm.events" in await expect_refused(
            publish_to("jlm.events", "job.enqueued"), pub_url
        )
        assert "jlm.jobs.demo" in await expect_refused(consume_from("jlm.jobs.demo"), pub_url)
        assert "jlm.requests" in await expect_refused(consume_from("jlm.requests"), pub_url)
        await expect_refused(declare("jlm.jobs.evil"), pub_url)
        # Topic permissions: only the five operations are routing keys it may use.
        msg = await expect_refused(publish_to("jlm.requests", "job.enqueued"), pub_url)
        assert "routing key" in msg or "topic" in msg

        # The worker reads its job queue, and nothing else of the daemon's.
        conn = await aio_pika.connect(worker_url)
        async with conn:
            ch = await conn.channel()
            q = await ch.get_queue("jlm.jobs.demo", ensure=False)
            got = await q.get(fail=False, no_ack=False)
            assert got is not None
            assert got.message_id == reply["new_job_id"]
            await got.ack()
        assert "jlm.requests" in await expect_refused(consume_from("jlm.requests"), worker_url)
        await expect_refused(consume_from("jlm.provenance"), worker_url)
        await expect_refused(publish_to("jlm.requests", "manage"), worker_url)
        await expect_refused(declare("jlm.jobs.evil"), worker_url)
    finally:
        await running.stop()
        delete_shared_users([pub, worker])


async def test_reply_to_cannot_aim_the_daemon_at_its_own_queues(
    make_settings: Callable[..., Settings], settings: Settings, vhost: str
) -> None:
    """The daemon answers through the default exchange, which reaches every queue: a publisher
    that may not write to jlm.jobs or jlm.provenance must not get there through reply_to."""
    pub = new_user("publisher", **PUBLISHER_GRANTS)
    add_shared_users([pub], vhost)
    running = await start_daemon(settings)
    try:
        conn = await aio_pika.connect(pub.url(SHARED_HOST, vhost))
        async with conn:
            ch = await conn.channel(publisher_confirms=True)
            exchange = await ch.get_exchange("jlm.requests", ensure=False)
            targets = ("jlm.jobs.demo", "jlm.provenance", "jlm.dead", "jlm.requests")
            for i, target in enumerate(targets):
                await exchange.publish(
                    request_message(
                        manage("demo", f"aim{i}"),
                        message_id=f"aimed-{i}",
                        reply_to=target,
                        correlation_id="c",
                        persistent=False,
                    ),
                    routing_key="manage",
                )
        # Each request is decided (its event is there) ...
        for _ in range(100):
            events = await read_stream(settings, idle=0.3)
            if {f"aimed-{i}" for i in range(4)} <= {e.get("request_id") for e in events}:
                break
        # ... and no reply landed in the daemon's queues.
        assert all("provenance_id" in e and "type" in e for e in events), events
        jobs = await drain_queue(settings, "jlm.jobs.demo")
        assert len(jobs) == 4
        assert all(orjson.loads(m.body).get("job_id") == m.message_id for m in jobs)
        assert await drain_queue(settings, "jlm.dead", timeout=0.5) == []
        assert (
            running.service.metrics.requests.labels(op="unknown", outcome="rejected")._value.get()
            == 0
        )
    finally:
        await running.stop()
        delete_shared_users([pub])


# =================================================================================================
# 2. TLS: Redis (TLS only, ACL user) and RabbitMQ (TLS listener, restricted user), mutual TLS
# =================================================================================================


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-tls"), pki=pki, default_user=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_rabbit(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    node = RabbitNode(tmp_path_factory.mktemp("rabbit-tls"), pki=pki)
    try:
        node.start()
        node.await_startup()
    except (AssertionError, subprocess.SubprocessError, OSError) as exc:
        node.stop()
        pytest.fail(f"could not start a TLS RabbitMQ node: {exc}")
    yield node
    node.stop()


class TlsSetup:
    """A vhost on the TLS node, its daemon and publisher users, and a Redis ACL user."""

    def __init__(self, node: RabbitNode, redis: RedisServer, pki: Pki, namespace: str) -> None:
        self.node, self.redis, self.pki, self.namespace = node, redis, pki, namespace
        self.vhost = f"jlm-tls-{namespace}"
        self.daemon_user = new_user("daemon", **DAEMON_GRANTS)
        self.publisher = new_user("publisher", **PUBLISHER_GRANTS)
        self.redis_user = f"jlm-{namespace}"
        self.redis_password = secret("redis")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.node.port}"

    async def create(self) -> None:
        v = erl_bin(self.vhost)
        self.node.ctl(
            "eval",
            f'ok = rabbit_vhost:add({v}, <<"jlm-tests">>), '
            + user_setup_expr([self.daemon_user, self.publisher], self.vhost),
        )
        admin = self.redis.admin()
        async with admin:
            rule = daemon_acl(self.redis_user, self.redis_password, self.namespace)
            await admin.execute_command("ACL", "SETUSER", *rule.split()[1:])

    def settings(self, user: BrokerUser | None = None, **env: str) -> Settings:
        u = user or self.daemon_user
        base = {
            "JLM_AMQP_URL": u.url(self.host, self.vhost, scheme="amqps"),
            "JLM_REDIS_URL": self.redis.url_as(self.redis_user, self.redis_password),
            "JLM_REDIS_NAMESPACE": self.namespace,
            "JLM_METRICS_ADDR": "127.0.0.1:0",
            "JLM_SHUTDOWN_TIMEOUT": "10",
            "JLM_TLS_CA_FILE": str(self.pki.ca),
            "JLM_TLS_CERT_FILE": str(self.pki.client_cert),
            "JLM_TLS_KEY_FILE": str(self.pki.client_key),
        }
        base.update(env)
        return load_settings(base)


@pytest.fixture
async def tls(
    tls_rabbit: RabbitNode, tls_redis: RedisServer, pki: Pki, namespace: str
) -> AsyncIterator[TlsSetup]:
    setup = TlsSetup(tls_rabbit, tls_redis, pki, namespace)
    await setup.create()
    yield setup
    tls_rabbit.ctl(
        "eval",
        f'rabbit_vhost:delete({erl_bin(setup.vhost)}, <<"jlm-tests">>), '
        f"rabbit_auth_backend_internal:delete_user({erl_bin(setup.daemon_user.name)}, "
        '<<"jlm-tests">>), '
        f"rabbit_auth_backend_internal:delete_user({erl_bin(setup.publisher.name)}, "
        '<<"jlm-tests">>).',
    )
    admin = tls_redis.admin()
    async with admin:
        await admin.execute_command("ACL", "DELUSER", setup.redis_user)


async def test_every_operation_over_tls_with_least_rights(tls: TlsSetup) -> None:
    settings = tls.settings()
    assert settings.amqp_urls[0].startswith("amqps://")
    assert settings.redis_url.startswith("rediss://")
    admin = tls.redis.admin()
    pubsub = admin.pubsub()
    await pubsub.subscribe(f"{tls.namespace}:cancel")
    running = await start_daemon(settings)
    try:
        async with client_as(tls.settings(tls.publisher)) as client:
            first = await client.call("manage", manage("report.render", "t"))
            assert first["success"] is True, first
            second = await client.call("manage", manage("report.render", "t"))
            assert second["stale_cancelled"] is True
            assert second["previous_job_id"] == first["new_job_id"]
            old = await client.call("status", {"job_id": first["new_job_id"]})
            assert old["state"] == "cancelled"
            assert old["superseded_by"] == second["new_job_id"]
            skip = await client.call("manage", manage("report.render", "t", policy="skip"))
            assert skip["deduplicated"] is True
            # A worker claims the job and caches a result (written as a worker does).
            keys = Keys(tls.namespace)
            j2 = second["new_job_id"]
            await admin.hset(keys.job(j2), "state", "running")
            _, result_key = scope_keys(tls.namespace, "t", "report.render")
            await admin.hset(result_key, mapping={"job": j2, "value": b"[1,2]", "at": "t"})
            cached = await client.call("result", {"job_type": "report.render", "cache_prefix": "t"})
            assert cached["cached"] is True
            assert cached["result"] == [1, 2]
            dropped = await client.call(
                "invalidate", {"job_type": "report.render", "cache_prefix": "t"}
            )
            assert dropped["cache_invalidated"] is True
            empty = await client.call("result", {"job_type": "report.render", "cache_prefix": "t"})
            assert empty["cached"] is False
            declined = await client.call("cancel", {"job_id": j2})
            assert declined["cancelled"] is False
            assert declined["state"] == "running"
            stopped = await client.call("cancel", {"job_id": j2, "running": True})
            assert stopped["cancelled"] is True
            # The cancellation reached the running job's channel (PUBLISH from Lua, under the ACL).
            told = None
            for _ in range(50):
                told = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
                if told is not None:
                    break
            assert told is not None
            assert told["data"] == j2.encode()
            nf = await client.call("status", {"job_id": UNKNOWN_JOB})
            assert nf["error"]["code"] == "not_found"
        assert running.service.health.ready
        conn = await amqp_connect(settings.amqp_urls[0], tls.pki)
        async with conn:
            types = [e["type"] for e in await events_on(conn)]
        for kind in ("job.enqueued", "job.superseded", "job.deduplicated", "cache.invalidated"):
            assert kind in types
        assert types.count("job.cancelled") == 1
        jobs = running.service.metrics.jobs_enqueued.labels(job_type="report.render", priority="5")
        assert jobs._value.get() == 2
    finally:
        await running.stop()
        await pubsub.aclose()
        await admin.aclose()


async def test_daemon_redis_user_reaches_only_its_namespace(tls: TlsSetup) -> None:
    user = aioredis.Redis.from_url(
        tls.redis.url_as(tls.redis_user, tls.redis_password), **tls.pki.redis_options()
    )
    ns = tls.namespace
    async with user:
        assert await user.eval("return redis.call('SET', KEYS[1], 'v')", 1, f"{ns}:x") == b"OK"
        refused: list[Callable[[], Awaitable[Any]]] = [
            lambda: user.get("other:x"),
            lambda: user.hset("other:h", "f", "v"),
            lambda: user.eval("return redis.call('GET', KEYS[1])", 1, "other:x"),
            lambda: user.eval("return redis.call('GET', 'other:x')", 0),
            lambda: user.eval("return redis.call('FLUSHALL')", 0),
            lambda: user.eval("return redis.call('PUBLISH', 'other:cancel', 'x')", 0),
            lambda: user.eval("return redis.call('KEYS', '*')", 0),
            lambda: user.keys("*"),
            user.flushall,
            lambda: user.config_get("*"),
            lambda: user.execute_command("ACL", "LIST"),
            lambda: user.publish("other:cancel", "x"),
        ]
        for i, call in enumerate(refused):
            with pytest.raises(
                (NoPermissionError, ResponseError), match=r"(?i)perm|can't (access|run|publish)"
            ) as info:
                await call()
            assert info.value is not None, i
        await user.eval("return redis.call('DEL', KEYS[1])", 1, f"{ns}:x")


async def test_shipped_redis_acl_grants_what_the_daemon_needs(tls: TlsSetup) -> None:
    """deploy/redis/users.acl (another deliverable) allows every command the daemon calls."""
    shipped = ROOT / "deploy" / "redis" / "users.acl"
    if not shipped.exists():
        pytest.skip("deploy/redis/users.acl is not there")
    line = next(ln for ln in shipped.read_text().splitlines() if ln.startswith("user jlm "))
    ns = tls.namespace
    rule = [
        f">{tls.redis_password}" if tok.startswith("#") else tok.replace("jlm:", f"{ns}:")
        for tok in line.split()[2:]
    ]
    name = f"shipped-{ns}"
    admin = tls.redis.admin()
    async with admin:
        await admin.execute_command("ACL", "SETUSER", name, "reset", *rule)
        try:
            key = f"{ns}:{{t}}:k"
            for cmd in daemon_commands(key, f"{ns}:cancel"):
                ok = await admin.execute_command("ACL", "DRYRUN", name, *cmd)
                assert ok == b"OK", (cmd, ok)
            denied = await admin.execute_command("ACL", "DRYRUN", name, "GET", "other:k")
            assert denied != b"OK"
        finally:
            await admin.execute_command("ACL", "DELUSER", name)


def daemon_commands(key: str, channel: str) -> list[list[str]]:
    return [
        ["EVALSHA", "0" * 40, "1", key],
        ["EVAL", "return 1", "1", key],
        ["SCRIPT", "LOAD", "return 1"],
        ["PING"],
        ["GET", key],
        ["SET", key, "v"],
        ["DEL", key],
        ["EXPIRE", key, "10"],
        ["HGET", key, "f"],
        ["HSET", key, "f", "v"],
        ["HMGET", key, "f"],
        ["HGETALL", key],
        ["LRANGE", key, "0", "-1"],
        ["LTRIM", key, "0", "-1"],
        ["RPUSH", key, "v"],
        ["PUBLISH", channel, "x"],
        ["TIME"],
        ["ZADD", key, "NX", "1", "m"],
        ["ZCARD", key],
        ["ZPOPMIN", key, "1"],
    ]


async def test_wrong_ca_fails_clearly_and_verify_is_on_by_default(
    tls: TlsSetup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = make_pki(tmp_path / "other-ca", name="some-other-ca")
    settings = tls.settings(JLM_TLS_CA_FILE=str(other.ca))
    assert settings.tls_verify is True
    from jlm.service import Service

    service = Service(settings)
    task = asyncio.create_task(service.run(handle_signals=False))
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = caplog.text
            if "redis is down" in text and "rabbitmq is down" in text:
                break
            await asyncio.sleep(0.2)
        down = [r.getMessage() for r in caplog.records if " is down" in r.getMessage()]
        for dep in ("redis", "rabbitmq"):
            line = next((m for m in down if m.startswith(dep)), None)
            assert line is not None, (dep, down)
            assert "CERTIFICATE_VERIFY_FAILED" in line, line
        assert not service.started.is_set()
        assert not service.health.ready
    finally:
        service.stop()
        await asyncio.wait_for(task, 30)
    # Turning verification off (tests only) is what it takes to connect with that CA.
    insecure = tls.settings(JLM_TLS_CA_FILE=str(other.ca), JLM_TLS_VERIFY="false")
    running = await start_daemon(insecure)
    try:
        for _ in range(50):
            if running.service.health.ready:
                break
            await asyncio.sleep(0.1)
        assert running.service.health.ready
    finally:
        await running.stop()


# =================================================================================================
# 3. Secrets: never in logs, errors, /metrics or check-config
# =================================================================================================


def base_env(**jlm: str) -> dict[str, str]:
    """A clean environment: no JLM_* or credentials of the test process leak in."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "VIRTUAL_ENV")}
    return keep | {"PYTHONPATH": str(ROOT / "daemon"), "JLM_LOG_FORMAT": "json"} | jlm


def assert_hidden(text: str, *passwords: str) -> None:
    for password in passwords:
        assert password not in text, f"a password leaked: ...{password[-6:]}"


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jlm", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@dataclass
class SecretSetup:
    """A private Redis (not started yet) whose daemon user has a password, and a broker user."""

    redis: RedisServer
    redis_user: str
    redis_password: str
    broker_user: BrokerUser  # created on the shared broker by the test, when it wants
    namespace: str
    vhost: str
    client_settings: Settings  # guest on the vhost: the test's own requests

    @property
    def amqp_url(self) -> str:
        return self.broker_user.url(SHARED_HOST, self.vhost)

    @property
    def redis_url(self) -> str:
        return self.redis.url_as(self.redis_user, self.redis_password)

    @property
    def passwords(self) -> tuple[str, str]:
        return (self.broker_user.password, self.redis_password)


@pytest.fixture
def secrets(
    make_settings: Callable[..., Settings], vhost: str, namespace: str, tmp_path: Path
) -> Iterator[SecretSetup]:
    password = secret("redis-pw")
    server = RedisServer(
        tmp_path / "redis", acl=[daemon_acl("jlmd", password, namespace)], default_user=False
    )
    broker_user = new_user("daemon", **DAEMON_GRANTS)
    yield SecretSetup(server, "jlmd", password, broker_user, namespace, vhost, make_settings())
    server.stop()
    with contextlib.suppress(subprocess.CalledProcessError):
        delete_shared_users([broker_user])


async def test_passwords_never_leak_through_errors_and_reconnects(
    secrets: SecretSetup, tmp_path: Path
) -> None:
    env = base_env(
        JLM_AMQP_URL=secrets.amqp_url,
        JLM_REDIS_URL=secrets.redis_url,
        JLM_REDIS_NAMESPACE=secrets.namespace,
        JLM_METRICS_ADDR="127.0.0.1:0",
        JLM_LOG_LEVEL="DEBUG",
        JLM_RETRY_MAX_DELAY="0.5",
    )
    broker_user = secrets.broker_user
    # The broker user does not exist yet: a login refused at start is a configuration error.
    refused = DaemonProcess("refused", env, tmp_path).start()
    assert await refused.wait_exit(60) == 78
    assert any(
        re.search(r"^cannot start: rabbitmq: login refused \(ACCESS_REFUSED\)", e["msg"])
        for e in refused.logs()
    ), refused.log_text()
    assert_hidden(refused.log_text(), *secrets.passwords)
    add_shared_users([broker_user], secrets.vhost)
    # Redis does not exist yet: connection errors, waited out.
    daemon = DaemonProcess("daemon", env, tmp_path).start()
    try:
        await daemon.wait_log(r"^consuming jlm\.requests")
        await daemon.wait_log(r"^redis is down")
        async with client_as(secrets.client_settings) as client:
            pending = await client.send("manage", manage("demo", "s"))
            assert pending is not None
            await daemon.wait_log(r"^waiting for redis")
            secrets.redis.start()  # Redis comes up on the port the URL names
            first = await asyncio.wait_for(pending, 30)
            assert first["success"] is True, first
            await daemon.wait_ready()
            # Cut the daemon's own broker connection (its user is this test's alone).
            seen = len(daemon.logs())
            close_user_connections(broker_user.name)
            await daemon.wait_log(r"^rabbitmq is down: connection lost", after=seen)
            await daemon.wait_log(r"^consuming jlm\.requests", after=seen)
            await daemon.wait_ready()
            second = await client.call("status", {"job_id": first["new_job_id"]})
            assert second["state"] == "pending"
        status, metrics = await daemon.get("/metrics")
        assert status == 200
        assert "jlm_dependency_up" in metrics
        assert_hidden(metrics, *secrets.passwords)
        for path in ("/healthz", "/readyz"):
            assert_hidden((await daemon.get(path))[1], *secrets.passwords)
    finally:
        code = await daemon.terminate()
    assert code == 0
    assert_hidden(daemon.log_text(), *secrets.passwords)
    logged = " ".join(e["msg"] for e in daemon.logs())
    assert broker_user.name in logged  # the URL is named, its password replaced
    assert "***" in logged
    for needed in ("rabbitmq is down", "redis is down", "connection lost"):
        assert needed in logged


@pytest.mark.parametrize("source", ["file", "credentials"])
async def test_passwords_from_files_never_leak(
    source: str, secrets: SecretSetup, tmp_path: Path
) -> None:
    secrets.redis.start()
    add_shared_users([secrets.broker_user], secrets.vhost)
    secrets_dir = tmp_path / "creds"
    secrets_dir.mkdir(mode=0o700)
    (secrets_dir / "amqp_url").write_text(secrets.amqp_url + "\n")
    (secrets_dir / "redis_url").write_text(f"  {secrets.redis_url}\n")
    if source == "file":
        where = {
            "JLM_AMQP_URL_FILE": str(secrets_dir / "amqp_url"),
            "JLM_REDIS_URL_FILE": str(secrets_dir / "redis_url"),
        }
    else:
        where = {"CREDENTIALS_DIRECTORY": str(secrets_dir)}
    env = base_env(
        JLM_REDIS_NAMESPACE=secrets.namespace,
        JLM_METRICS_ADDR="127.0.0.1:0",
        JLM_LOG_LEVEL="DEBUG",
        **where,
    )
    daemon = DaemonProcess("daemon", env, tmp_path).start()
    try:
        await daemon.wait_log(r"^consuming jlm\.requests")
        await daemon.wait_ready()
        async with client_as(secrets.client_settings) as client:
            reply = await client.call("manage", manage("demo", "f"))
            assert reply["success"] is True
            seen = len(daemon.logs())
            close_user_connections(secrets.broker_user.name)
            await daemon.wait_log(r"^rabbitmq is down", after=seen)
            await daemon.wait_log(r"^consuming jlm\.requests", after=seen)
            again = await client.call("status", {"job_id": reply["new_job_id"]})
            assert again["success"] is True
        assert_hidden((await daemon.get("/metrics"))[1], *secrets.passwords)
        for args in (("check-config",), ("check-config", "--json")):
            done = run_cli(env, *args)
            assert done.returncode == 0, done.stderr
            assert_hidden(done.stdout + done.stderr, *secrets.passwords)
            assert secrets.broker_user.name in done.stdout
            assert "***" in done.stdout
        checked = json.loads(done.stdout)
        assert checked["amqp_urls"] == [redact_url(secrets.amqp_url)]
        assert checked["redis_url"] == redact_url(secrets.redis_url)
    finally:
        code = await daemon.terminate()
    assert code == 0
    assert_hidden(daemon.log_text(), *secrets.passwords)


@pytest.mark.unit
def test_check_config_and_config_errors_hide_passwords(tmp_path: Path) -> None:
    amqp_pw, redis_pw, other_pw = secret("a"), secret("r"), secret("o")
    urls = {
        "JLM_AMQP_URL": f"amqps://d:{amqp_pw}@n1:5671/v,amqps://d:{other_pw}@n2:5671/v",
        "JLM_REDIS_URL": f"rediss://jlm:{redis_pw}@r:6380/0",
    }
    env = base_env(**urls)
    for args in (("check-config",), ("check-config", "--json")):
        done = run_cli(env, *args)
        assert done.returncode == 0, done.stderr
        assert_hidden(done.stdout + done.stderr, amqp_pw, redis_pw, other_pw)
    # A bad setting: exit 78 naming it, and still no password.
    for bad, name in (
        ({"JLM_PREFETCH": "abc"}, "JLM_PREFETCH"),
        ({"JLM_HEARTBEAT": "-1"}, "JLM_HEARTBEAT"),
        ({"JLM_AMQP_URL": f"http://d:{amqp_pw}@n1/"}, "JLM_AMQP_URL"),
        ({"JLM_REDIS_URL": f"http://jlm:{redis_pw}@r/"}, "JLM_REDIS_URL"),
        ({"JLM_AMQP_URL_FILE": str(tmp_path / "missing")}, "JLM_AMQP_URL_FILE"),
        ({"JLM_TLS_CA_FILE": str(tmp_path / "missing.pem")}, "JLM_TLS_CA_FILE"),
    ):
        # `run` and `check-config` load the settings alike; `run` once is enough.
        for command in ("run", "check-config") if name == "JLM_PREFETCH" else ("check-config",):
            done = run_cli(base_env(**urls | bad), command)
            assert done.returncode == 78, (bad, done.stderr)
            assert name in done.stderr, done.stderr
            assert_hidden(done.stdout + done.stderr, amqp_pw, redis_pw, other_pw)


@pytest.mark.unit
@pytest.mark.parametrize(
    "password",
    ["plain", "with:colon", "p@ss@word", "sl/ash", "pct%40enc", "comma,sep", "sp ace?#x"],
)
def test_redact_url_hides_any_password(password: str) -> None:
    for template in (
        "amqp://user:{}@host:5672/vhost",
        "rediss://:{}@host:6380/0",
        "amqps://me@example.org:{}@host/",  # a user name with '@' (LDAP, e-mail style)
        "amqp://a:{}@h1/,amqp://b:{}@h2/",
    ):
        url, hidden = template.format(password, password), template.format("***", "***")
        assert redact_url(url) == hidden
        assert redact_url(f"failed: {url}: refused") == f"failed: {hidden}: refused"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("amqp://guest@h/") == "amqp://guest@h/"


@pytest.mark.unit
def test_load_settings_reads_secret_files(tmp_path: Path) -> None:
    (tmp_path / "amqp_url").write_text("  amqp://u:p1@h/\n")
    (tmp_path / "redis_url").write_text("redis://u:p2@h/0\n")
    from_cred = load_settings({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert from_cred.amqp_url == "amqp://u:p1@h/"
    assert from_cred.redis_url == "redis://u:p2@h/0"
    (tmp_path / "other").write_text("amqp://u:p3@h/")
    first = load_settings(
        {
            "CREDENTIALS_DIRECTORY": str(tmp_path),
            "JLM_AMQP_URL_FILE": str(tmp_path / "other"),
            "JLM_AMQP_URL": "amqp://u:p4@h/",
        }
    )
    assert first.amqp_url == "amqp://u:p3@h/"  # JLM_*_FILE, then the credential, then the variable
    with pytest.raises(ConfigError, match="JLM_REDIS_URL_FILE"):
        load_settings({"JLM_REDIS_URL_FILE": str(tmp_path / "nope")})


# =================================================================================================
# 4. Limits are enforced before any Redis call
# =================================================================================================


_HUGE = b'{"job_type": "lim", "payload": {"b": "' + b"x" * 1_048_600 + b'"}}'
_DEEP = b'{"job_type": "lim", "payload": ' + b'{"a":' * 32 + b"1" + b"}" * 32 + b"}"
_DEEP_LIST = b'{"job_type": "lim", "cache_prefix": ' + b"[" * 40 + b"]" * 40 + b"}"
_BAD_ID = b'{"job_id": "0123456789-' + b"0" * 32 + b'", "x": 1}'
LIMIT_BREAKERS: list[tuple[str, bytes, str]] = [
    ("manage", _HUGE, "payload_too_large"),
    ("manage", _DEEP, "invalid_request"),
    ("result", _DEEP_LIST, "invalid_request"),
    ("manage", b'{"job_type": "lim", "payload": {"x": NaN}}', "invalid_request"),
    ("manage", b'{"job_type": "lim", "payload": {"x": Infinity}}', "invalid_request"),
    ("manage", b'{"job_type": "lim", "payload": {"x": -Infinity}}', "invalid_request"),
    ("manage", b'{"job_type": "lim", "job_type": "lim2", "payload": {}}', "invalid_request"),
    ("manage", b'{"job_type": "lim", "payload": {}', "invalid_request"),
    ("status", _BAD_ID, "invalid_request"),
    ("cancel", b"\xff\xfe", "invalid_request"),
    ("launch", b'{"job_type": "lim", "payload": {}}', "unsupported_operation"),
]


async def test_rejected_requests_make_no_redis_call(
    make_settings: Callable[..., Settings], tmp_path: Path, namespace: str
) -> None:
    server = RedisServer(tmp_path / "redis", default_user=False)
    server.start()
    admin = server.admin()
    settings = make_settings(JLM_REDIS_URL=server.url_as("admin", server.admin_password))
    running = await start_daemon(settings)
    seen: list[str] = []
    try:
        for _ in range(50):
            if running.service.health.ready:
                break
            await asyncio.sleep(0.1)
        async with admin.monitor() as monitor, client_as(settings) as client:

            async def watch() -> None:
                while True:
                    seen.append((await monitor.next_command())["command"])

            watcher = asyncio.create_task(watch())
            # A Redis call before and after, which MONITOR must show: they bound the window.
            await client.call("result", {"job_type": "lim", "cache_prefix": "sentinel-1"})
            for op, body, code in LIMIT_BREAKERS:
                reply = await client.call(op, body)
                assert reply["error"]["code"] == code, (body[:60], reply)
            await client.call("result", {"job_type": "lim", "cache_prefix": "sentinel-2"})
            for _ in range(50):
                if any("sentinel-2" in c for c in seen):
                    break
                await asyncio.sleep(0.05)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    finally:
        await running.stop()
        await admin.aclose()
        server.stop()
    start = max(i for i, c in enumerate(seen) if "sentinel-1" in c)
    end = min(i for i, c in enumerate(seen) if "sentinel-2" in c)
    window = seen[start + 1 : end]
    # Only the daemon's readiness probe (a script call on a fixed key) and PINGs in between.
    others = [c for c in window if "{0000000000}" not in c and not c.startswith("PING")]
    assert others == [], others
