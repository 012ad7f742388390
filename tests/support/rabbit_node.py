"""A RabbitMQ node of the test's own on loopback: own name, ports, Erlang cookie and files.

The machine's broker (rabbit@localhost on 5672) is never touched. A node gets its own AMQP (or,
with a test CA, TLS-only) and distribution ports, its own mnesia/log/config files and an empty
plugin list (no management listener) under one directory, and its own Erlang cookie through HOME
(a `.erlang.cookie` of mode 400; the nodes of one cluster share one HOME). Nodes share the
machine's epmd on 4369, which is what nodes of one host do.

The scripts are run from /usr/lib/rabbitmq/bin when present: the Debian wrappers in /usr/sbin
switch to the `rabbitmq` user with `su`, which resets HOME and so the cookie.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from tests.support.pki import Pki
from tests.support.ports import free_ports

_LIB_BIN = Path("/usr/lib/rabbitmq/bin")


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


def make_home(home: Path) -> Path:
    """A HOME with an Erlang cookie of its own, for the nodes (and rabbitmqctl) that use it."""
    home.mkdir(parents=True, exist_ok=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text(uuid.uuid4().hex.upper())
    cookie.chmod(0o400)
    return home


class RabbitNode:
    """One rabbitmq-server process in the foreground, in a session of its own.

    `home`: a HOME with the Erlang cookie (a cluster's nodes share one; by default the node makes
    its own). `ctl_ports`: the range of rabbitmqctl's own distribution ports. `pki`: a TLS
    listener only (client certificates required) instead of a plain AMQP one.
    """

    def __init__(
        self,
        base: Path,
        name: str | None = None,
        *,
        home: Path | None = None,
        ctl_ports: tuple[int, int] | None = None,
        pki: Pki | None = None,
    ) -> None:
        self.short = name or f"jlmn-{uuid.uuid4().hex[:8]}"
        self.nodename = f"{self.short}@localhost"
        self.dir = base / self.short
        self.dir.mkdir(parents=True, exist_ok=True)
        self.home = home or make_home(self.dir / "home")
        self.port, self.dist_port = free_ports(2)
        self.ctl_ports = ctl_ports
        self.pki = pki
        self.proc: subprocess.Popen[bytes] | None = None
        (self.dir / "rabbitmq.conf").write_text(self._config())
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")

    def _config(self) -> str:
        lines = ["log.console = false", "log.file.level = info"]
        if self.pki is None:
            lines.append(f"listeners.tcp.1 = 127.0.0.1:{self.port}")
        else:
            ssl_options = {
                "cacertfile": self.pki.ca,
                "certfile": self.pki.server_cert,
                "keyfile": self.pki.server_key,
                "verify": "verify_peer",
                "fail_if_no_peer_cert": "true",
            }
            lines += [
                "listeners.tcp = none",
                f"listeners.ssl.default = 127.0.0.1:{self.port}",
                *(f"ssl_options.{key} = {value}" for key, value in ssl_options.items()),
                "disk_free_limit.absolute = 10MB",
            ]
        return "\n".join(lines) + "\n"

    def url(self, vhost: str = "") -> str:
        scheme = "amqps" if self.pki else "amqp"
        return f"{scheme}://guest:guest@127.0.0.1:{self.port}/{vhost}"

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
                "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.dir / "log"),
                "RABBITMQ_PID_FILE": str(self.pid_file),
                "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
                # Keep /etc/rabbitmq/rabbitmq-env.conf (the shared node's settings) out.
                "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                    "-kernel inet_dist_use_interface {127,0,0,1}"
                ),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
            }
        )
        if self.ctl_ports is not None:
            env["RABBITMQ_CTL_DIST_PORT_MIN"] = str(self.ctl_ports[0])
            env["RABBITMQ_CTL_DIST_PORT_MAX"] = str(self.ctl_ports[1])
        return env

    def start(self) -> None:
        """Start the node; `await_startup()` waits until it runs."""
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
        """rabbitmqctl against this node; its stdout (AssertionError if it fails and `check`)."""
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
                tail = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                chunks.append(f"--- {path.name}\n{tail}")
        return "\n".join(chunks) or "(no log)"
