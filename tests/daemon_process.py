"""Run `jlm run` as a real process, as an operator would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from jlm.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JLM_")}
    env.update(
        {
            "JLM_AMQP_URL": settings.amqp_url,
            "JLM_REDIS_URL": settings.redis_url,
            "JLM_REDIS_NAMESPACE": settings.redis_namespace,
            "JLM_LOG_FORMAT": "json",
            "PYTHONPATH": str(ROOT),
        }
    )
    if settings.config is not None:
        env["JLM_CONFIG"] = str(settings.config)
    env.update(extra)
    return env


class DaemonProcess:
    def __init__(self, settings: Settings, log: IO[Any], **extra: str) -> None:
        self.port = free_port()
        self.env = env_for(settings, JLM_METRICS_ADDR=f"127.0.0.1:{self.port}", **extra)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jlm", "run"],
            env=self.env,
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                    if s.recv(100).split()[1] == b"200":
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("daemon not ready in time")

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
