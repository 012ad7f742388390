"""The bench's private corner of the shared servers: a fresh vhost, a Redis DB and namespace."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import uuid
from dataclasses import dataclass, field
from importlib import metadata

import redis
import redis.asyncio as aioredis

AMQP_BASE = os.environ.get("JLM_BENCH_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")
REDIS_BASE = os.environ.get("JLM_BENCH_REDIS_BASE", "redis://127.0.0.1:6379")


def rabbit_eval(expr: str) -> str:
    """What tests/conftest.py does: vhosts made with one `rabbitmqctl eval`, no HTTP API needed."""
    done = subprocess.run(
        ["rabbitmqctl", "eval", expr], check=True, capture_output=True, text=True, timeout=120
    )
    return done.stdout


@dataclass
class BenchEnv:
    """A fresh vhost and an empty Redis DB (with its own key namespace), removed at the end."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    vhost: str = ""
    redis_db: int = -1
    namespace: str = ""

    @property
    def amqp_url(self) -> str:
        return f"{AMQP_BASE}/{self.vhost}"

    @property
    def redis_url(self) -> str:
        return f"{REDIS_BASE}/{self.redis_db}"

    async def open(self, redis_db: int | None) -> None:
        self.vhost = f"jlm-bench-{self.run_id}"
        self.namespace = f"jlmb{self.run_id}"
        rabbit_eval(
            f'rabbit_vhost:add(<<"{self.vhost}">>, <<"jlm-bench">>), '
            f'rabbit_auth_backend_internal:set_permissions(<<"guest">>, <<"{self.vhost}">>, '
            f'<<".*">>, <<".*">>, <<".*">>, <<"jlm-bench">>).'
        )
        self.redis_db = redis_db if redis_db is not None else await _empty_db()

    async def close(self) -> None:
        if self.vhost:
            rabbit_eval(f'rabbit_vhost:delete(<<"{self.vhost}">>, <<"jlm-bench">>).')
        if self.redis_db >= 0:
            await delete_namespace(self.redis_url, self.namespace)

    def daemon_env(self, metrics_port: int, **extra: str) -> dict[str, str]:
        env = {
            "JLM_AMQP_URL": self.amqp_url,
            "JLM_REDIS_URL": self.redis_url,
            "JLM_REDIS_NAMESPACE": self.namespace,
            "JLM_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
            "JLM_LOG_LEVEL": "WARNING",
            "JLM_LOG_FORMAT": "text",
            # The audit stream of a soak would otherwise grow to the 2 GiB default.
            "JLM_PROVENANCE_MAX_BYTES": str(512 * 1024 * 1024),
        }
        env.update(extra)
        return env


async def _empty_db() -> int:
    """The highest-numbered Redis DB that holds no key (tests use DB 0 with namespaces)."""
    client = aioredis.Redis.from_url(f"{REDIS_BASE}/0")
    try:
        databases = int((await client.config_get("databases"))["databases"])
        keyspace = await client.info("keyspace")
    finally:
        await client.aclose()
    for db in range(databases - 1, 0, -1):
        if f"db{db}" not in keyspace:
            return db
    raise SystemExit("bench: no empty Redis DB; pass --redis-db")


async def delete_namespace(url: str, namespace: str) -> int:
    client = aioredis.Redis.from_url(url)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{namespace}:*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                deleted += await client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += await client.unlink(*batch)
    finally:
        await client.aclose()
    return deleted


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo", encoding="utf-8") as f:
            mem_kb = int(f.readline().split()[1])
    except OSError:
        mem_kb = 0
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
    }


def loadavg() -> str:
    with open("/proc/loadavg", encoding="utf-8") as f:
        return " ".join(f.read().split()[:3])


def versions(redis_url: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("aio-pika", "aiormq", "redis", "orjson", "uvloop", "job-lifecycle-manager"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "-"
    try:
        text = subprocess.run(
            ["rabbitmqctl", "version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        out["rabbitmq"] = text.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError):
        out["rabbitmq"] = "?"
    try:
        erl = rabbit_eval("erlang:system_info(otp_release).")
        out["erlang"] = re.sub(r"[^0-9.]", "", erl)
    except (OSError, subprocess.SubprocessError):
        out["erlang"] = "?"
    client = redis.Redis.from_url(redis_url)
    try:
        out["redis-server"] = client.info("server")["redis_version"]
    finally:
        client.close()
    return out
