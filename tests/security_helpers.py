"""Private servers and throw-away credentials for the security tests.

A test CA with server and client certificates (openssl), a Redis started by the test (plain or
TLS only, with ACL users), a RabbitMQ node started by the test with a TLS listener, and short-lived
users with narrow permissions on the shared broker's per-test vhost. Everything listens on loopback
only and is removed when the test (or module) ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import redis.asyncio as aioredis
from aio_pika.abc import AbstractConnection
from tests.conftest import rabbit_eval

# The least set of Redis rights the daemon needs (see docs/security.md): the script calls, PING for
# the client's health checks, and the commands the Lua scripts call (they run under the same ACL).
DAEMON_REDIS_COMMANDS = (
    "+evalsha +eval +script|load +ping "
    "+get +set +del +expire +hget +hset +hmget +hgetall +lrange +ltrim +rpush +publish +time "
    "+sismember +scard +sadd"
)


def daemon_acl(user: str, password: str, namespace: str) -> str:
    """An ACL line: the daemon's keys `<namespace>:*`, its channel `<namespace>:cancel`."""
    return (
        f"user {user} on >{password} resetkeys ~{namespace}:* "
        f"resetchannels &{namespace}:cancel -@all {DAEMON_REDIS_COMMANDS}"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def secret(label: str) -> str:
    """A password that is easy to search for and found nowhere else."""
    return f"{label}-{uuid.uuid4().hex}"


# -- certificates ----------------------------------------------------------------------------------

_LEAF_EXT = """[leaf]
subjectAltName = IP:127.0.0.1, DNS:localhost
extendedKeyUsage = serverAuth, clientAuth
keyUsage = critical, digitalSignature, keyEncipherment
basicConstraints = critical, CA:FALSE
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(frozen=True)
class Pki:
    """A throw-away CA, one server certificate (127.0.0.1, localhost) and one client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx

    def redis_options(self) -> dict[str, Any]:
        return {
            "ssl_ca_certs": str(self.ca),
            "ssl_certfile": str(self.client_cert),
            "ssl_keyfile": str(self.client_key),
        }


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_pki(directory: Path, name: str = "jlm-test-ca") -> Pki:
    """Create the CA and the two leaf certificates in `directory` (EC P-256, valid two days)."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", f"/CN={name}", cwd=directory)  # fmt: skip
    (directory / "leaf.cnf").write_text(_LEAF_EXT)
    for leaf in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{leaf}.key", "-out", f"{leaf}.csr",
                 "-subj", f"/CN={leaf}.{name}", cwd=directory)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{leaf}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{leaf}.crt", "-days", "2",
                 "-extfile", "leaf.cnf", "-extensions", "leaf", cwd=directory)  # fmt: skip
    for path in directory.iterdir():
        path.chmod(0o644)  # the RabbitMQ node runs as the rabbitmq user; these are throw-away keys
    directory.chmod(0o755)
    return Pki(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )


# -- Redis -----------------------------------------------------------------------------------------


class RedisServer:
    """A redis-server of the test's own: plain or TLS-only, with the given ACL users."""

    def __init__(
        self,
        directory: Path,
        *,
        pki: Pki | None = None,
        acl: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        self.directory = directory
        self.pki = pki
        self.port = port or free_port()
        self.admin_password = secret("redis-admin")
        self._acl = list(acl)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def scheme(self) -> str:
        return "rediss" if self.pki else "redis"

    def url(self, user: str | None = None, password: str | None = None, db: int = 0) -> str:
        auth = f"{user or ''}:{password}@" if password else ""
        return f"{self.scheme}://{auth}127.0.0.1:{self.port}/{db}"

    def _config(self) -> str:
        lines = [
            "bind 127.0.0.1",
            'save ""',
            "appendonly no",
            f"dir {self.directory}",
            "user default off",
            f"user admin on >{self.admin_password} ~* &* +@all",
            *self._acl,
        ]
        if self.pki is None:
            lines.append(f"port {self.port}")
        else:
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {self.pki.server_cert}",
                f"tls-key-file {self.pki.server_key}",
                f"tls-ca-cert-file {self.pki.ca}",
                "tls-auth-clients yes",
            ]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "redis.conf"
        conf.write_text(self._config())
        with (self.directory / "redis.log").open("ab") as log:
            self._proc = subprocess.Popen(["redis-server", str(conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not listen on {self.port}: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def admin(self) -> aioredis.Redis:
        """A client with every right, for the test's own checks."""
        opts = self.pki.redis_options() if self.pki else {}
        return aioredis.Redis.from_url(self.url("admin", self.admin_password), **opts)


# -- a RabbitMQ node with TLS ----------------------------------------------------------------------


class RabbitNode:
    """A RabbitMQ node of the test's own, TLS listener only, on loopback, as the rabbitmq user."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.name = f"jlm-tls-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="jlm-tls-node-"))
        self._env: dict[str, str] = {}

    def start(self) -> None:
        d = self.directory
        for sub in ("mnesia", "log"):
            (d / sub).mkdir()
        # The node runs as the rabbitmq user: give it its own copies of the server's files.
        for src in (self.pki.ca, self.pki.server_cert, self.pki.server_key):
            shutil.copyfile(src, d / src.name)
        (d / "rabbitmq.conf").write_text(
            "listeners.tcp = none\n"
            f"listeners.ssl.default = 127.0.0.1:{self.port}\n"
            f"ssl_options.cacertfile = {d / self.pki.ca.name}\n"
            f"ssl_options.certfile = {d / self.pki.server_cert.name}\n"
            f"ssl_options.keyfile = {d / self.pki.server_key.name}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = true\n"
            "disk_free_limit.absolute = 10MB\n"
            "log.console = false\n"
        )
        (d / "enabled_plugins").write_text("[].\n")
        (d / "none.conf").write_text("")
        rabbit = pwd.getpwnam("rabbitmq")
        d.chmod(0o755)
        for path in [d, *d.rglob("*")]:
            os.chown(path, rabbit.pw_uid, rabbit.pw_gid)
        self._env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            # Keep /etc/rabbitmq/rabbitmq-env.conf (the shared node's settings) out of this node.
            "RABBITMQ_CONF_ENV_FILE": str(d / "none.conf"),
            "RABBITMQ_PID_FILE": str(d / "pid"),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        subprocess.run(
            ["rabbitmq-server", "-detached"],
            env=self._env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 90
        while True:
            done = subprocess.run(
                ["rabbitmqctl", "-n", self.name, "await_startup", "--timeout", "60"],
                env=self._env,
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"RabbitMQ node {self.name} did not start: {done.stdout[-500:]!r} "
                    f"{done.stderr[-500:]!r} {self.log_tail()}"
                )
            time.sleep(0.5)

    def ctl(self, *args: str) -> str:
        done = subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args],
            env=self._env,
            check=True,
            capture_output=True,
            timeout=60,
            text=True,
        )
        return done.stdout

    def log_tail(self) -> str:
        logs = sorted((self.directory / "log").glob("*.log"))
        return "".join(p.read_text(errors="replace")[-2000:] for p in logs)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.ctl("stop")
        shutil.rmtree(self.directory, ignore_errors=True)


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
