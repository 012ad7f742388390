"""The processes under test (`jlm run`, `python -m bench.relay`) and the servers' CPU use."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Proc:
    """A subprocess under test, stopped with SIGTERM (it drains and exits 0)."""

    name: str
    popen: subprocess.Popen[bytes]
    metrics_port: int | None = None

    @classmethod
    def start(
        cls, name: str, argv: list[str], env: dict[str, str], metrics_port: int | None
    ) -> Proc:
        full_env = dict(os.environ)
        full_env.update(env)
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), ROOT) if p)
        popen = subprocess.Popen(argv, env=full_env, cwd=ROOT, stdout=subprocess.DEVNULL)
        return cls(name, popen, metrics_port)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss_mib(self) -> float:
        return psutil.Process(self.pid).memory_info().rss / 1024 / 1024

    def cpu_seconds(self) -> float:
        t = psutil.Process(self.pid).cpu_times()
        return float(t.user + t.system)

    def metric(self, name: str) -> float:
        """The sum of a metric's samples from the daemon's /metrics (label-blind)."""
        assert self.metrics_port is not None
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until /readyz answers 200 (the daemon consumes)."""
        assert self.metrics_port is not None
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}")
            if await asyncio.to_thread(_answers, url):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready within {timeout:.0f}s")

    async def stop(self, timeout: float = 30.0) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.alive():
            self.popen.kill()
        return self.popen.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def start_daemon(env: dict[str, str]) -> Proc:
    port = int(env["JLM_METRICS_ADDR"].rsplit(":", 1)[1])
    jlm = os.path.join(os.path.dirname(sys.executable), "jlm")
    return Proc.start("daemon", [jlm, "run"], env, port)


def start_relay(
    env: dict[str, str], prefetch: int, *, echo: bool = False, contract: bool = False
) -> Proc:
    argv = [sys.executable, "-m", "bench.relay", "--prefetch", str(prefetch)]
    if echo:
        argv.append("--echo")
    if contract:
        argv.append("--contract")
    return Proc.start("relay", argv, env, None)


class ServerCpu:
    """CPU seconds of the RabbitMQ and Redis servers the bench uses (found by their listening
    port: other nodes may run on the machine), read-only."""

    def __init__(self, amqp_port: int = 5672, redis_port: int = 6379) -> None:
        self.procs: dict[str, psutil.Process] = {}
        wanted = {amqp_port: "rabbitmq", redis_port: "redis"}
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.pid:
                name = wanted.get(conn.laddr.port)
                if name and name not in self.procs:
                    self.procs[name] = psutil.Process(conn.pid)

    def seconds(self) -> dict[str, float]:
        out = {}
        for name, p in self.procs.items():
            try:
                t = p.cpu_times()
                out[name] = float(t.user + t.system)
            except psutil.Error:
                out[name] = 0.0
        return out
