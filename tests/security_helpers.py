"""Least rights for the security tests: the daemon's Redis ACL, and short-lived users with narrow
permissions on a broker's vhost (the shared one, or a node of the test's own).

The private servers and the test CA are in tests/support (redis_server.py, rabbit_node.py, pki.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection
from tests.support.pki import Pki, secret
from tests.support.services import rabbit_eval

# The least set of Redis rights the daemon needs (see docs/security.md): the script calls, PING for
# the client's health checks, and the commands the Lua scripts call (they run under the same ACL).
DAEMON_REDIS_COMMANDS = (
    "+evalsha +eval +script|load +ping "
    "+get +set +del +expire +hget +hset +hmget +hgetall +lrange +ltrim +rpush +publish +time "
    "+sismember +scard +sadd +zadd +zrem +zrangebyscore +zcard +zpopmin"
)


def daemon_acl(user: str, password: str, namespace: str) -> str:
    """An ACL line: the daemon's keys `<namespace>:*`, its channel `<namespace>:cancel`."""
    return (
        f"user {user} on >{password} resetkeys ~{namespace}:* "
        f"resetchannels &{namespace}:cancel -@all {DAEMON_REDIS_COMMANDS}"
    )


# -- users with narrow permissions -----------------------------------------------------------------


def erl_bin(text: str) -> str:
    """An Erlang binary literal."""
    return '<<"' + text.replace("\\", "\\\\").replace('"', '\\"') + '">>'


@dataclass(frozen=True)
class BrokerUser:
    """A broker user, its password and its grants on one vhost (regular expressions)."""

    name: str
    password: str
    configure: str
    write: str
    read: str
    topic_write: str | None = None  # on jlm.requests, when set
    topics: tuple[tuple[str, str], ...] = ()  # (topic exchange, write pattern)

    def url(self, host_port: str, vhost: str, scheme: str = "amqp") -> str:
        return f"{scheme}://{self.name}:{self.password}@{host_port}/{vhost}"


PUBLISHER_GRANTS = {
    "configure": r"^amq\.gen.*",
    "write": r"^jlm\.requests$",
    "read": r"^amq\.gen.*",
    "topic_write": r"^(manage|cancel|status|invalidate|result)$",
}
WORKER_GRANTS = {"configure": "^$", "write": r"^jlm\.(jobs|events)$", "read": r"^jlm\.jobs\..*"}
# The daemon needs no server-named (amq.gen-*) queue of its own: it only publishes replies to
# them, through the default exchange.
DAEMON_GRANTS = {
    "configure": r"^jlm\.",
    "write": r"^jlm\.|^amq\.default$",
    "read": r"^jlm\.",
}


def user_setup_expr(users: Iterable[BrokerUser], vhost: str) -> str:
    """One Erlang expression that creates the users and grants them their permissions."""
    steps = []
    actor = erl_bin("jlm-tests")
    for u in users:
        n, v = erl_bin(u.name), erl_bin(vhost)
        steps.append(
            f"ok = rabbit_auth_backend_internal:add_user({n}, {erl_bin(u.password)}, {actor})"
        )
        steps.append(
            f"ok = rabbit_auth_backend_internal:set_permissions({n}, {v}, {erl_bin(u.configure)}, "
            f"{erl_bin(u.write)}, {erl_bin(u.read)}, {actor})"
        )
        topics = list(u.topics)
        if u.topic_write is not None:
            topics.append(("jlm.requests", u.topic_write))
        for exchange, write in topics:
            steps.append(
                f"ok = rabbit_auth_backend_internal:set_topic_permissions({n}, {v}, "
                f"{erl_bin(exchange)}, {erl_bin(write)}, {erl_bin('^$')}, {actor})"
            )
    return ", ".join(steps) + "."


def user_delete_expr(users: Iterable[BrokerUser]) -> str:
    actor = erl_bin("jlm-tests")
    names = ", ".join(erl_bin(u.name) for u in users)
    return (
        f"lists:foreach(fun(N) -> rabbit_auth_backend_internal:delete_user(N, {actor}) end, "
        f"[{names}])."
    )


def add_shared_users(users: Sequence[BrokerUser], vhost: str) -> None:
    """Create users on the shared broker (names unique to the test run)."""
    rabbit_eval(user_setup_expr(users, vhost))


def delete_shared_users(users: Sequence[BrokerUser]) -> None:
    rabbit_eval(user_delete_expr(users))


def close_user_connections(user: str) -> None:
    """Cut every connection of one user (a user of this test only) on the shared broker."""
    rabbit_eval(
        f"rabbit_networking:close_all_user_connections({erl_bin(user)}, "
        '"jlm security test: connection cut on purpose").'
    )


def new_user(label: str, **grants: str) -> BrokerUser:
    return BrokerUser(name=f"jlmt-{label}-{uuid.uuid4().hex[:8]}", password=secret(label), **grants)


DEFINITIONS = Path(__file__).resolve().parents[1] / "deploy" / "rabbitmq" / "definitions.json"


def deploy_user(role: str) -> BrokerUser:
    """A fresh user with exactly the permissions and topic permissions that
    deploy/rabbitmq/definitions.json gives `role` on its vhost."""
    data = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    (perm,) = [p for p in data["permissions"] if p["user"] == role]
    topics = tuple(
        (t["exchange"], t["write"]) for t in data.get("topic_permissions", []) if t["user"] == role
    )
    return BrokerUser(
        name=f"jlmt-{role}-{uuid.uuid4().hex[:8]}",
        password=secret(role),
        configure=perm["configure"],
        write=perm["write"],
        read=perm["read"],
        topics=topics,
    )


async def amqp_connect(url: str, pki: Pki | None = None) -> AbstractConnection:
    kwargs: dict[str, Any] = {"timeout": 10}
    if pki is not None:
        kwargs["ssl_context"] = pki.client_context()
    conn: AbstractConnection = await aio_pika.connect(url, **kwargs)
    return conn
