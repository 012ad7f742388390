"""Scheduled jobs: the scheduler's lateness at a steady due rate, and debounce beside replace.

    python -m bench.scheduled                          # 1,000 due jobs a second for 60 s
    python -m bench.scheduled --rate 1000 --seconds 20 --daemons 2 --requests 5000

Lateness: `rate x seconds` jobs, each in its own scope, are decided in this process through
`Lifecycle` (manage.lua and the due entry, as a daemon does), with `not_before` times `1/rate`
apart, starting once the last is decided. Then `--daemons` daemons (`jlm run`) publish them; a
consumer of the job queue takes each job message's arrival time minus its due time.

Throughput: `--requests` manage requests over 100 scopes through one daemon's request path, once
with `policy: "replace"`, once with `policy: "debounce"` (a window longer than the run, so the
second burst measures the decision, not the scheduler); replies a second, 500 requests in flight.
Everything runs on a fresh vhost and Redis DB, removed at the end. The machine may be shared:
quote the load average printed beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage
from tests.support.ports import free_port

from bench.env import BenchEnv, loadavg
from bench.procs import Proc, start_daemon
from jlm.client import Client
from jlm.config import Settings, load_settings
from jlm.keys import Keys
from jlm.lifecycle import Context, Lifecycle
from jlm.metrics import Metrics
from jlm.protocol import ManageRequest
from jlm.store import Store, connect

JOB_TYPE = "bench.scheduled"
QUEUE = f"jlm.jobs.{JOB_TYPE}"


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * q))]


async def preload(settings: Settings, n: int, rate: float) -> dict[str, float]:
    """n scheduled jobs due 1/rate apart from just after the last decision; job id -> due (s)."""
    metrics = Metrics(process=False)
    store = Store(connect(settings.redis_url), Keys(settings.redis_namespace), metrics)
    lifecycle = Lifecycle(store, settings, metrics)
    lead = n / 1500 + 5.0  # seconds: deciding n jobs here ran at 2,600/s on a loaded 2-core VM
    start = time.time() + lead
    due: dict[str, float] = {}
    late = 0

    async def one(i: int) -> None:
        nonlocal late
        at = start + i / rate
        req = ManageRequest(
            job_type=JOB_TYPE,
            cache_prefix=f"b{i}",
            payload={"i": i},
            not_before=datetime.fromtimestamp(at, UTC).isoformat(),
        )
        ctx = Context(request_id=uuid.uuid4().hex, idempotent=False, actor=None)
        out = await lifecycle.manage(req, ctx)
        if out.reply["state"] != "scheduled":
            late += 1
        due[out.reply["new_job_id"]] = at

    for base in range(0, n, 500):
        await asyncio.gather(*(one(i) for i in range(base, min(n, base + 500))))
    await store.close()
    left = start - time.time()
    print(f"decided {n} scheduled jobs; {left:.1f} s before the first is due; {late} decided late")
    return due


async def lateness(env: BenchEnv, settings: Settings, args: argparse.Namespace) -> None:
    n = int(args.rate * args.seconds)
    arrivals: dict[str, list[float]] = {}
    conn = await aio_pika.connect(settings.amqp_urls[0])
    ch = await conn.channel()
    await ch.set_qos(prefetch_count=2000)
    q = await ch.declare_queue(QUEUE, durable=True, arguments={"x-max-priority": 10})

    async def on(msg: AbstractIncomingMessage) -> None:
        arrivals.setdefault(orjson.loads(msg.body)["job_id"], []).append(time.time())
        await msg.ack()

    await q.consume(on)
    daemons = [daemon(env) for _ in range(args.daemons)]
    for d in daemons:
        await d.wait_ready()
    due = await preload(settings, n, args.rate)
    end = max(due.values()) + 15
    while len(arrivals) < n and time.time() < end:
        await asyncio.sleep(0.5)
    await asyncio.sleep(1)
    late = [arrivals[j][0] - at for j, at in due.items() if j in arrivals]
    early = sum(1 for x in late if x < 0)
    twice = sum(1 for v in arrivals.values() if len(v) > 1)
    print(
        f"lateness of {len(late)}/{n} jobs due at {args.rate:g}/s for {args.seconds:g} s, "
        f"{args.daemons} daemons: p50 {pct(late, 0.5) * 1000:.0f} ms, p99 "
        f"{pct(late, 0.99) * 1000:.0f} ms, max {max(late) * 1000:.0f} ms; {early} early, "
        f"{twice} published twice, {n - len(late)} missing; load {loadavg()}"
    )
    for d in daemons:
        await d.stop()
    await conn.close()


def daemon(env: BenchEnv) -> Proc:
    return start_daemon(env.daemon_env(free_port()))


async def one_pass(client: Client, policy: str, requests: int) -> float:
    """Requests a second of one pass: `requests` manage requests over 100 fresh scopes."""
    extra: dict[str, Any] = {"debounce_ms": 600_000} if policy == "debounce" else {}
    window = asyncio.Semaphore(500)
    tag = uuid.uuid4().hex[:6]

    async def call(i: int) -> None:
        body = {"job_type": JOB_TYPE, "cache_prefix": f"t{tag}{i % 100}", "payload": {}}
        async with window:
            reply = await client.call("manage", {**body, "policy": policy, **extra})
        assert reply["success"], reply

    started = time.perf_counter()
    await asyncio.gather(*(call(i) for i in range(requests)))
    return requests / (time.perf_counter() - started)


async def throughput(env: BenchEnv, settings: Settings, requests: int) -> None:
    d = daemon(env)
    await d.wait_ready()
    async with Client(settings) as client:
        for policy in ("replace", "debounce", "replace", "debounce"):
            rate = await one_pass(client, policy, requests)
            print(f"{policy:>8}: {rate:,.0f} requests/s ({requests} over 100 scopes, one daemon)")
    print(f"load {loadavg()}")
    await d.stop()


async def main(args: argparse.Namespace) -> None:
    env = BenchEnv()
    await env.open(args.redis_db)
    try:
        settings = load_settings(env.daemon_env(0))
        if args.seconds > 0:
            await lateness(env, settings, args)
        if args.requests > 0:
            await throughput(env, settings, args.requests)
    finally:
        await env.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=1000.0, help="due jobs a second")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds of due jobs (0: skip)")
    p.add_argument("--daemons", type=int, default=2)
    p.add_argument("--requests", type=int, default=5000, help="per throughput pass (0: skip)")
    p.add_argument("--redis-db", type=int, default=None)
    os.environ.setdefault("JLM_LOG_LEVEL", "WARNING")
    asyncio.run(main(p.parse_args()))
