"""A RabbitMQ cluster of the test's own on loopback: N nodes, own names, ports, cookie and files.

The machine's broker (rabbit@localhost on 5672) is never touched. Each node here gets a node name
`jlmc<i>-<run>@localhost`, its own AMQP and distribution ports, its own mnesia/log/config files and
an empty plugin list (no management listener) under one temporary directory, and the cluster's own
Erlang cookie through HOME (a `.erlang.cookie` of mode 400). The nodes share the machine's epmd on
4369, which is what nodes of one host do.

The scripts are run from /usr/lib/rabbitmq/bin when present: the Debian wrappers in /usr/sbin
switch to the `rabbitmq` user with `su`, which resets HOME and so the cookie.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_LIB_BIN = Path("/usr/lib/rabbitmq/bin")
# The policy docs/scaling.md asks for: the classic queues (job queues, jlm.dead) mirrored on every
# node (RabbitMQ 3.x); the quorum request queue and the stream replicate by themselves.
MIRROR_POLICY = ("jlm-classic-ha", r"^jlm\.(jobs\..+|dead)$", '{"ha-mode":"all"}')


def _script(name: str) -> str:
    direct = _LIB_BIN / name
    if direct.exists():
        return str(direct)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(name)
    return found


def available() -> bool:
    """Whether rabbitmq-server and rabbitmqctl are installed."""
    try:
        _script("rabbitmq-server")
        _script("rabbitmqctl")
    except FileNotFoundError:
        return False
    return True


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int, low: int = 20000, high: int = 30000) -> list[int]:
    """n free loopback ports below the ephemeral range (so that dist + 10000 still fits)."""
    ports: list[int] = []
    rng = random.Random()
    while len(ports) < n:
        p = rng.randrange(low, high)
        if p not in ports and _port_free(p):
            ports.append(p)
    return ports


class RabbitNode:
    """One rabbitmq-server process in the foreground, in a session of its own."""

    def __init__(self, base: Path, name: str, home: Path, ctl_ports: tuple[int, int]) -> None:
        self.short = name
        self.nodename = f"{name}@localhost"
        self.dir = base / name
        self.home = home
        self.port, self.dist_port = _free_ports(2)
        self.ctl_ports = ctl_ports
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\nlog.console = false\nlog.file.level = info\n"
        )
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")

    def url(self, vhost: str = "") -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost}"

    @property
    def pid_file(self) -> Path:
        return self.dir / "beam.pid"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            {
                "HOME": str(self.home),
                "RABBITMQ_NODENAME": self.nodename,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_CTL_DIST_PORT_MIN": str(self.ctl_ports[0]),
                "RABBITMQ_CTL_DIST_PORT_MAX": str(self.ctl_ports[1]),
                "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.dir / "log"),
                "RABBITMQ_PID_FILE": str(self.pid_file),
                "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
                "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                    "-kernel inet_dist_use_interface {127,0,0,1}"
                ),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
            }
        )
        return env

    def start(self) -> None:
        log = open(self.dir / "stdout.log", "ab")  # noqa: SIM115 - owned by the process
        try:
            self.proc = subprocess.Popen(
                [_script("rabbitmq-server")],
                env=self.env(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def ctl(self, *args: str, timeout: float = 90.0, check: bool = True) -> str:
        done = subprocess.run(
            [_script("rabbitmqctl"), "-n", self.nodename, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl -n {self.nodename} {' '.join(args)} exited {done.returncode}: "
                f"{done.stdout[-500:]} {done.stderr[-1500:]}"
            )
        return done.stdout

    def await_startup(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.nodename} exited: {self.log_tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.nodename} did not start: {self.log_tail()}")
            # await_startup fails at once while the node is not yet registered with epmd.
            try:
                self.ctl("await_startup", "--timeout", str(int(max(left, 1))), timeout=left + 10)
                return
            except AssertionError:
                time.sleep(0.5)

    def beam_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the Erlang VM: no goodbye to clients or to the other nodes."""
        pid = self.beam_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def stop(self) -> None:
        """Teardown: a clean stop, then SIGKILL of the node's own process group."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.ctl("stop", timeout=30, check=False)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        pid = self.beam_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def log_tail(self, lines: int = 20) -> str:
        chunks = []
        for path in [self.dir / "stdout.log", *sorted((self.dir / "log").glob("*.log"))]:
            if path.exists():
                tail = "\n".join(path.read_text().splitlines()[-lines:])
                chunks.append(f"--- {path.name}\n{tail}")
        return "\n".join(chunks) or "(no log)"


class RabbitCluster:
    """N nodes joined to the first one; `start()` returns how long the cluster took to form."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.run = uuid.uuid4().hex[:6]
        self.dir = workdir
        self.home = workdir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        # The CLI's own distribution ports: a private range, not the machine's 35672-35682.
        ctl_low = random.randrange(40000, 44000, 50)
        self.nodes = [
            RabbitNode(workdir, f"jlmc{i + 1}-{self.run}", self.home, (ctl_low, ctl_low + 40))
            for i in range(size)
        ]
        self.timings: dict[str, float] = {}

    def urls(self, vhost: str = "") -> list[str]:
        return [n.url(vhost) for n in self.nodes]

    def start(self) -> float:
        started = time.monotonic()
        for node in self.nodes:
            node.start()
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda n: n.await_startup(), self.nodes))
        self.timings["nodes_up"] = time.monotonic() - started
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", seed.nodename)
            node.ctl("start_app")
        self.wait_members(len(self.nodes))
        self.timings["cluster_formed"] = time.monotonic() - started
        return self.timings["cluster_formed"]

    def running_nodes(self, via: RabbitNode | None = None) -> list[str]:
        node = via or next(n for n in self.nodes if n.running)
        out = node.ctl("eval", "rabbit_nodes:all_running().")
        return sorted(part.strip(" []'\n") for part in out.strip().strip("[]").split(","))

    def wait_members(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.running_nodes()) == n:
                return
            time.sleep(0.5)
        raise AssertionError(f"cluster has {self.running_nodes()} running, expected {n}")

    def stop(self) -> None:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda n: n.stop(), self.nodes))
