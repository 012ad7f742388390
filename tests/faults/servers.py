"""Server instances owned by one test: a redis-server to kill, a 3-master Redis Cluster.

The machine's Redis on 6379 is shared and is never touched here; each instance lives in its own
temporary directory on a free loopback port and is killed when the test ends.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process on 127.0.0.1, restartable on the same port and directory."""

    def __init__(self, workdir: Path, *, aof: bool, extra: tuple[str, ...] = ()) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.aof = aof
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.aof
            else ["--appendonly", "no"]
        )
        return [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.dir),
            "--save",
            "",
            *persistence,
            "--logfile",
            str(self.log),
            "--protected-mode",
            "no",
            *self.extra,
        ]

    def start(self, timeout: float = 20.0) -> RedisServer:
        self.proc = subprocess.Popen(
            self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        try:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    err = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                    raise AssertionError(f"redis-server exited {self.proc.returncode}: {err}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.BusyLoadingError:
                    pass
                except redis.exceptions.ConnectionError:
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        raise AssertionError(f"redis-server on {self.port} not ready in {timeout}s")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        self.kill()


class RedisClusterServers:
    """Three masters, no replicas, created with `redis-cli --cluster create`."""

    def __init__(self, workdir: Path, masters: int = 3, extra: tuple[str, ...] = ()) -> None:
        """`extra`: more redis-server arguments for every node."""
        self.nodes = [
            RedisServer(
                workdir / f"node{i}",
                aof=False,
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

    def start(self, timeout: float = 60.0) -> RedisClusterServers:
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
                    states.append(_cluster_state(c.execute_command("CLUSTER INFO")))  # type: ignore[no-untyped-call]
            if all(state == "ok" for state in states):
                return self
            time.sleep(0.1)
        raise AssertionError("the Redis Cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


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
