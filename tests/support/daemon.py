"""`jlm run` as a real process, as an operator runs it: start, SIGKILL, restart, SIGTERM; its JSON
logs (one file per run) and its HTTP endpoints."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

from jlm.config import Settings

ROOT = Path(__file__).resolve().parents[2]
_PORT_RE = re.compile(r"metrics and health on http://[^:\s]+:(\d+)")


def jlm_env(amqp_url: str, redis_url: str, namespace: str, **extra: str) -> dict[str, str]:
    """The environment of one `jlm` command: what the test chooses, never the caller's JLM_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JLM_")}
    env.update(
        {
            "JLM_AMQP_URL": amqp_url,
            "JLM_REDIS_URL": redis_url,
            "JLM_REDIS_NAMESPACE": namespace,
            "JLM_LOG_FORMAT": "json",
            "PYTHONPATH": str(ROOT),
        }
    )
    env.update(extra)
    return env


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `jlm` command using `settings` (and its config file, if any)."""
    if settings.config is not None:
        extra = {"JLM_CONFIG": str(settings.config), **extra}
    return jlm_env(settings.amqp_url, settings.redis_url, settings.redis_namespace, **extra)


def daemon_env(amqp_url: str, redis_url: str, namespace: str, **extra: str) -> dict[str, str]:
    """The environment of one `jlm run`: an ephemeral metrics port, a short shutdown and retry."""
    return jlm_env(
        amqp_url,
        redis_url,
        namespace,
        **{
            "JLM_METRICS_ADDR": "127.0.0.1:0",
            "JLM_SHUTDOWN_TIMEOUT": "10",
            "JLM_RETRY_MAX_DELAY": "0.5",
            **extra,
        },
    )


async def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET `path` on 127.0.0.1:`port`: (status, body)."""

    async def get() -> tuple[int, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode()

    return await asyncio.wait_for(get(), timeout)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        series, _, rest = head.partition("{")
        if series != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


def exits(daemons: list[DaemonProcess], codes: list[int]) -> str:
    """The log tail of each daemon that did not exit 0: what an assertion on the codes shows."""
    return "\n".join(
        f"{d.name} exited {code}:\n{d.tail(40)}"
        for d, code in zip(daemons, codes, strict=True)
        if code
    )


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float, name: str) -> int:
    """Wait until a process exits (polling: the event loop goes on); its exit code."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not exit within {timeout}s")
        await asyncio.sleep(0.02)
    return proc.returncode


class DaemonProcess:
    """One `python -m jlm run` (or another module, such as the fault launcher), restartable.

    Each run writes stdout and stderr to `<logdir>/<name>.<run>.log`; the metrics port is read
    from the daemon's log. The async methods are for async tests; a plain test calls the
    `*_blocking` ones. Used as a context manager, it is killed on exit if still running.
    """

    def __init__(
        self, name: str, env: dict[str, str], logdir: Path, *, module: str = "jlm"
    ) -> None:
        self.name = name
        self.env = env
        self.logdir = logdir
        self.module = module
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.port: int | None = None
        self.kills = 0

    @classmethod
    def of(cls, settings: Settings, logdir: Path, name: str = "daemon", **extra: str) -> Self:
        """A daemon with `settings` (extra environment on top), started."""
        env = env_for(settings, **{"JLM_METRICS_ADDR": "127.0.0.1:0", **extra})
        return cls(name, env, logdir).start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def log_path(self) -> Path:
        return self.logdir / f"{self.name}.{self.runs}.log"

    def start(self, **extra_env: str) -> Self:
        self.runs += 1
        self.port = None
        argv = [sys.executable, "-m", self.module]
        if self.module == "jlm":
            argv.append("run")
        self.logdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, env={**self.env, **extra_env}, stdout=log, stderr=log, cwd=ROOT
            )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _find_port(self) -> int | None:
        if self.port is None and self.log_path.exists():
            m = _PORT_RE.search(self.log_path.read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
        return self.port

    async def wait_ready(self, timeout: float = 40.0) -> float:
        """Wait until /readyz answers 200; return how long that took."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise AssertionError(f"{self.name} exited: {self.tail()}")
            if await self.ready():
                return time.monotonic() - started
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.name} not ready within {timeout}s: {self.tail()}")

    def wait_ready_blocking(self, timeout: float = 40.0) -> float:
        return asyncio.run(self.wait_ready(timeout))

    async def ready(self) -> bool:
        port = self._find_port()
        if port is None:
            return False
        try:
            status, _ = await http_get(port, "/readyz", timeout=2)
        except (OSError, TimeoutError):
            return False
        return status == 200

    async def get(self, path: str) -> tuple[int, str]:
        """GET one of the daemon's HTTP endpoints: (status, body)."""
        port = self._find_port()
        assert port is not None, f"{self.name} has not logged its metrics port"
        return await http_get(port, path)

    async def metrics(self) -> str:
        return (await self.get("/metrics"))[1]

    def kill(self) -> None:
        """SIGKILL, if still running."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.kills += 1

    async def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return await wait_exit(self.proc, timeout, self.name)

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM: drain and exit; return the exit code."""
        assert self.proc is not None
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait_exit(timeout)

    def terminate_blocking(self, timeout: float = 30.0) -> int:
        return asyncio.run(self.terminate(timeout))

    def logs(self) -> list[dict[str, Any]]:
        """Every JSON log record of every run (non-JSON lines as {'msg': line})."""
        out = []
        for run in range(1, self.runs + 1):
            path = self.logdir / f"{self.name}.{run}.log"
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({"msg": line})
        return out

    async def wait_log(self, pattern: str, *, after: int = 0, timeout: float = 30) -> int:
        """Wait for a log record whose message matches `pattern`, past the first `after` records;
        return its index in `logs()`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, entry in enumerate(self.logs()[after:], start=after):
                if re.search(pattern, str(entry.get("msg", ""))):
                    return i
            if not self.running:
                raise AssertionError(f"{self.name} exited: {self.tail()}")
            await asyncio.sleep(0.1)
        raise AssertionError(f"no log line matching {pattern!r}: {self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return "\n".join(
            (self.logdir / f"{self.name}.{run}.log").read_text(errors="replace")
            for run in range(1, self.runs + 1)
            if (self.logdir / f"{self.name}.{run}.log").exists()
        )

    def tail(self, lines: int = 15) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
