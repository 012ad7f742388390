"""redis-server instances owned by one test: one to kill, fill or restart; one with TLS and ACL
users; a 3-master Redis Cluster.

The machine's Redis on 6379 is shared and is never touched here; each instance lives in its own
directory on a free loopback port and is stopped when the test ends.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import redis
import redis.asyncio as aioredis
from tests.support.pki import Pki, secret
from tests.support.ports import free_port


class RedisServer:
    """One redis-server on 127.0.0.1, restartable on the same port and directory.

    `aof`: append-only file with fsync always (what survives a SIGKILL); `pki`: TLS only, client
    certificates required; `acl`: ACL user lines; `default_user=False` turns the passwordless
    default user off. An `admin` user with every right is always there (`admin()`, `client()`).
    `extra`: more redis-server arguments.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        aof: bool = False,
        extra: Sequence[str] = (),
        pki: Pki | None = None,
        acl: Sequence[str] = (),
        default_user: bool = True,
        port: int | None = None,
    ) -> None:
        self.dir = workdir
        self.port = port or free_port()
        self.aof = aof
        self.extra = tuple(extra)
        self.pki = pki
        self.acl = list(acl)
        self.default_user = default_user
        self.admin_password = secret("redis-admin")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "redis.log"

    @property
    def scheme(self) -> str:
        return "rediss" if self.pki else "redis"

    @property
    def url(self) -> str:
        """The URL without credentials (the default user)."""
        return self.url_as()

    def url_as(self, user: str | None = None, password: str | None = None, db: int = 0) -> str:
        auth = f"{user or ''}:{password}@" if password else ""
        return f"{self.scheme}://{auth}127.0.0.1:{self.port}/{db}"

    def config(self) -> str:
        lines = [
            "bind 127.0.0.1",
            "protected-mode no",
            'save ""',
            f"dir {self.dir}",
            f"logfile {self.log}",
            f"user admin on >{self.admin_password} ~* &* +@all",
            *self.acl,
        ]
        lines += ["appendonly yes", "appendfsync always"] if self.aof else ["appendonly no"]
        if not self.default_user:
            lines.append("user default off")
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

    def start(self, timeout: float = 20.0) -> Self:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "redis.conf"
        conf.write_text(self.config())
        self.proc = subprocess.Popen(
            ["redis-server", str(conf), *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until it answers PING (not while it loads its data set)."""
        deadline = time.monotonic() + timeout
        with contextlib.closing(self.client(socket_connect_timeout=1)) as client:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"redis-server exited {self.proc.returncode}: {self.log_tail()}"
                    )
                with contextlib.suppress(
                    redis.exceptions.BusyLoadingError, redis.exceptions.ConnectionError
                ):
                    if client.ping():
                        return
                time.sleep(0.05)
        raise AssertionError(f"redis-server on {self.port} not ready in {timeout}s")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def _options(self) -> dict[str, Any]:
        return {"ssl": True, **self.pki.redis_options()} if self.pki else {}

    def client(self, **options: Any) -> redis.Redis:
        """A client (admin: every right) for the test's own checks."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            username="admin",
            password=self.admin_password,
            **self._options(),
            **options,
        )

    def admin(self) -> aioredis.Redis:
        """An asyncio client with every right, for the test's own checks."""
        opts = self.pki.redis_options() if self.pki else {}
        return aioredis.Redis.from_url(self.url_as("admin", self.admin_password), **opts)

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (SIGKILL if it does not exit within 10 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


class RedisClusterServers:
    """Three masters, no replicas, created with `redis-cli --cluster create`."""

    def __init__(self, workdir: Path, masters: int = 3, extra: tuple[str, ...] = ()) -> None:
        """`extra`: more redis-server arguments for every node."""
        self.nodes = [
            RedisServer(
                workdir / f"node{i}",
                extra=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    # An explicit bus port: the default (port + 10000) may be taken or too high.
                    "--cluster-port",
                    str(free_port()),
                    *extra,
                ),
            )
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 60.0) -> Self:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            for node in self.nodes:
                with contextlib.closing(node.client()) as c:
                    states.append(_cluster_state(c.execute_command("CLUSTER INFO")))  # type: ignore[no-untyped-call]  # redis-py: untyped
            if all(state == "ok" for state in states):
                return self
            time.sleep(0.1)
        raise AssertionError("the Redis Cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        """SIGKILL every node: nothing of theirs is needed after the test."""
        for node in self.nodes:
            node.kill()


def _cluster_state(info: object) -> str | None:
    """`cluster_state` from CLUSTER INFO, whether redis-py parsed it (dict) or not (bytes)."""
    if isinstance(info, dict):
        value = info.get("cluster_state")
        return value.decode() if isinstance(value, bytes) else value
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("cluster_state:"):
            return line.split(":", 1)[1].strip()
    return None
