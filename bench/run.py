"""`make bench`: the daemon's full `manage` decision against a bare relay, in one run.

    python -m bench.run            # the full run (about 50 minutes on a busy 2-core machine)
    python -m bench.run --quick    # small counts, one repetition: a smoke test of the bench
    python -m bench.run --soak     # also RSS after 1,000,000 requests (about an hour on 2 cores)

Everything runs on a fresh vhost and an empty Redis DB with its own key namespace, both removed at
the end. The relay and the daemon run as subprocesses (`python -m bench.relay`, `jlm run`), each on
uvloop with the same aio-pika connection settings; the bench process only publishes, counts
queues and reads replies. See docs/performance.md for what each number means.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
import uvloop
from pamqp.commands import Basic
from tests.support.ports import free_port

from bench import celery_peer, report
from bench import latency as lat
from bench.amqp import (
    JOB_QUEUE,
    RELAY_OUT,
    REPLIES,
    REQUESTS,
    Amqp,
    declare,
    message_ids,
    now_iso,
    properties,
    request_body,
    steady_rate,
)
from bench.env import BenchEnv, loadavg, machine, versions
from bench.procs import Proc, ServerCpu, start_daemon, start_relay
from bench.redisstats import (
    commandstats,
    db_keys,
    delta,
    prepopulate,
    sample_ttls,
    used_memory,
)
from jlm.config import Settings, load_settings


@dataclass
class Run:
    """One measured pass over a pre-loaded queue."""

    rate: float
    cpu: dict[str, float]  # share of one core during the steady window, by process
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Bench:
    args: argparse.Namespace
    env: BenchEnv
    settings: Settings
    amqp: Amqp
    redis: aioredis.Redis
    servers: ServerCpu
    results: dict[str, Any] = field(default_factory=dict)

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} load {loadavg()}] {msg}", flush=True)

    # -- pre-loading -----------------------------------------------------------------------------

    def requests(
        self, n: int, scopes: Iterator[int], run: str
    ) -> Iterator[tuple[bytes, Basic.Properties]]:
        ident = message_ids(run, n)
        at = now_iso()
        for i in range(n):
            mid = ident(i)
            yield request_body(next(scopes), i, at), properties(mid, mid, reply=True)

    async def fresh_queues(self) -> None:
        # The job queue is declared by the daemon on first use: purge() skips a missing queue.
        await self.amqp.purge(REQUESTS, REPLIES, RELAY_OUT, JOB_QUEUE)

    async def preload(self, n: int, scopes: Iterator[int], run: str) -> None:
        await self.fresh_queues()
        started = time.monotonic()
        await self.amqp.preload(self.requests(n, scopes, run))
        queued = await self.amqp.count(REQUESTS)
        if queued != n:
            raise RuntimeError(f"pre-load: {queued} queued, expected {n}")
        self.log(f"pre-loaded {n} requests in {time.monotonic() - started:.1f}s")

    # -- one pass --------------------------------------------------------------------------------

    async def measure(self, proc: Proc, out_queue: str, n: int) -> Run:
        """Poll the output queue until n messages; rate and CPU shares in the 10-90 % window."""
        samples: list[tuple[float, int, float, dict[str, float]]] = []
        last_change, last = time.monotonic(), -1
        while True:
            count = await self.amqp.count(out_queue)
            now = time.monotonic()
            samples.append((now, count, proc.cpu_seconds(), self.servers.seconds()))
            if count != last:
                last, last_change = count, now
            if count >= n:
                break
            if now - last_change > 60:
                raise RuntimeError(f"{proc.name}: stuck at {count}/{n}")
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited at {count}/{n}")
            await asyncio.sleep(0.02)
        rate = steady_rate([(t, c) for t, c, _, _ in samples], n)
        lo = next(s for s in samples if s[1] >= 0.1 * n)
        hi = next(s for s in samples if s[1] >= 0.9 * n)
        wall = max(hi[0] - lo[0], 1e-9)
        cpu = {proc.name: (hi[2] - lo[2]) / wall}
        for name, secs in hi[3].items():
            cpu[name] = (secs - lo[3].get(name, secs)) / wall
        return Run(rate, cpu)

    async def relay_pass(self, n: int, k: int, *, contract: bool = False) -> Run:
        name = "contract relay" if contract else "relay"
        await self.preload(n, cycle(self.args.scopes), f"relay{k}")
        proc = start_relay(self.daemon_env(), self.args.relay_prefetch, contract=contract)
        try:
            run = await self.measure(proc, RELAY_OUT, n)
        finally:
            await proc.stop()
        self.log(f"{name} #{k}: {run.rate:,.0f}/s  cpu {fmt_cpu(run.cpu, run.rate)}")
        return run

    def daemon_env(self, **extra: str) -> dict[str, str]:
        env = self.env.daemon_env(free_port(), **extra)
        if self.args.prefetch:
            env["JLM_PREFETCH"] = str(self.args.prefetch)
        return env

    async def daemon_pass(self, n: int, scopes: Iterator[int], label: str) -> Run:
        await self.preload(n, scopes, label)
        before = await commandstats(self.redis)
        env = self.daemon_env()
        if label.startswith("baseline"):
            env["PYTHONPATH"] = self.args.baseline  # another copy of the `jlm` package first
        proc = start_daemon(env)
        profiler = self.start_profiler(proc, label)
        try:
            run = await self.measure(proc, REPLIES, n)
            after = await commandstats(self.redis)
            run.extra["scripts"] = proc.metric("jlm_redis_script_duration_seconds_count")
            run.extra["rss_mib"] = proc.rss_mib()
        finally:
            code = await proc.stop()
            if profiler is not None:
                profiler.wait(timeout=60)
        d = delta(before, after)
        run.extra["evalsha"] = d.get("evalsha", 0) + d.get("eval", 0)
        run.extra["commands"] = sum(d.values())
        run.extra["exit"] = code
        tally = await self.amqp.drain_replies(n)
        run.extra["replies"] = tally
        if tally.get("ok") != n:
            raise RuntimeError(f"{label}: replies {tally}, expected {n} ok")
        jobs = await self.amqp.count(JOB_QUEUE)
        if jobs != n:
            raise RuntimeError(f"{label}: {jobs} job messages, expected {n}")
        self.log(
            f"daemon {label}: {run.rate:,.0f}/s  cpu {fmt_cpu(run.cpu, run.rate)}  "
            f"evalsha/req {run.extra['evalsha'] / n:.3f}  exit {code}"
        )
        return run

    def start_profiler(self, proc: Proc, label: str) -> subprocess.Popen[bytes] | None:
        if not self.args.profile or not label.startswith("scopes1k-1"):
            return None
        spy = shutil.which("py-spy") or shutil.which("py-spy", path=sys.prefix + "/bin")
        if spy is None:
            self.log("--profile: py-spy is not installed (pip install py-spy)")
            return None
        out = self.args.profile
        fmt = {"json": "speedscope", "txt": "raw"}.get(out.rsplit(".", 1)[-1], "flamegraph")
        seconds = str(self.args.profile_seconds)
        # Start-up (imports, declarations) is not what we are after: begin two seconds in.
        argv = ["sh", "-c", 'sleep 2; exec "$0" "$@"', spy, "record", "--pid", str(proc.pid)]
        argv += ["-o", out, "-f", fmt, "-d", seconds, "-r", "250"]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # -- phases ----------------------------------------------------------------------------------

    async def throughput(self) -> None:
        n, reps = self.args.requests, self.args.reps
        relay: list[Run] = []
        contract: list[Run] = []
        daemon: list[Run] = []
        celery: list[Run] = []
        # Interleaved, so that a change of background load hits both sides alike.
        for k in range(1, reps + 1):
            if "relay" in self.args.phases:
                relay.append(await self.relay_pass(n, k))
            if "contract" in self.args.phases:
                contract.append(await self.relay_pass(n, k, contract=True))
            if "daemon" in self.args.phases:
                if self.args.baseline:
                    base = await self.daemon_pass(n, cycle(self.args.scopes), f"baseline-{k}")
                    self.results.setdefault("baseline", []).append(base)
                daemon.append(await self.daemon_pass(n, cycle(self.args.scopes), f"scopes1k-{k}"))
            if "celery" in self.args.phases:
                celery.append(await self.celery_pass(n, k))
        if relay:
            self.results["relay"] = relay
        if contract:
            self.results["contract"] = contract
        if daemon:
            self.results["daemon"] = daemon
        if celery:
            self.results["celery"] = celery

    async def celery_pass(self, n: int, k: int) -> Run:
        rate, cpu = await celery_peer.run_pass(self.env.amqp_url, n, self.servers)
        await self.amqp.purge(celery_peer.QUEUE)
        self.log(f"celery apply_async #{k}: {rate:,.0f}/s  cpu {fmt_cpu(cpu, rate)}")
        return Run(rate, cpu)

    async def latency(self) -> None:
        daemon_max = statistics.median(r.rate for r in self.results["daemon"])
        rate = daemon_max / 2
        self.results["latency_rate"] = rate
        out: dict[str, list[float]] = {}
        # The bare relay answers after its one confirm; the contract relay after the job's
        # confirm and then the events' (the daemon's order), deciding nothing.
        for name in ("daemon", "relay", "contract"):
            await self.fresh_queues()
            proc = (
                start_daemon(self.daemon_env())
                if name == "daemon"
                else start_relay(
                    self.daemon_env(),
                    self.args.relay_prefetch,
                    echo=True,
                    contract=name == "contract",
                )
            )
            try:
                if name == "daemon":
                    await proc.wait_ready()
                else:
                    await asyncio.sleep(1.0)
                values = await lat.measure(
                    self.env.amqp_url,
                    REPLIES,
                    rate=rate,
                    seconds=self.args.latency_seconds,
                    scopes=self.args.scopes,
                    run=f"lat{name}",
                )
            finally:
                await proc.stop()
            out[name] = values
            self.log(
                f"latency {name} at {rate:,.0f}/s: p50 {lat.percentile(values, 50) * 1e3:.2f} ms, "
                f"p99 {lat.percentile(values, 99) * 1e3:.2f} ms ({len(values)} samples)"
            )
        self.results["latency"] = out

    async def scopes(self) -> None:
        n, reps = self.args.requests, self.args.scope_reps or self.args.reps
        one = [await self.daemon_pass(n, cycle(1), f"scope1-{k}") for k in range(1, reps + 1)]
        self.results["scope1"] = one
        big = self.args.big_scopes
        keys0, _ = await db_keys(self.redis, self.env.redis_db)
        mem0 = await used_memory(self.redis)
        started = time.monotonic()
        await prepopulate(self.env.redis_url, self.env.namespace, big, start_at=1_000_000)
        mem1 = await used_memory(self.redis)
        keys1, _ = await db_keys(self.redis, self.env.redis_db)
        self.log(
            f"pre-populated {big:,} scopes in {time.monotonic() - started:.0f}s: "
            f"{(mem1 - mem0) / big:.0f} B and {(keys1 - keys0) / big:.2f} keys per scope"
        )
        self.results["scope_memory"] = (mem1 - mem0) / big
        self.results["scope_keys"] = (keys1 - keys0) / big
        picks = list(range(1_000_000, 1_000_000 + big))
        many: list[Run] = []
        for k in range(1, reps + 1):
            chosen = random.sample(picks, min(n, big))
            many.append(
                await self.daemon_pass(n, iter(chosen * (n // len(chosen) + 1)), f"scopes1M-{k}")
            )
        self.results["scope_big"] = many

    async def keyspace(self) -> None:
        keys, expiring = await db_keys(self.redis, self.env.redis_db)
        sampled, without = await sample_ttls(self.redis, 2000)
        self.results["keys"] = (keys, expiring, sampled, without)
        self.log(
            f"keyspace: {keys:,} keys, {expiring:,} with a TTL; sample {sampled}: {without} without"
        )

    async def rss(self) -> None:
        """Feed the daemon continuously; its RSS at each checkpoint."""
        checkpoints = self.args.rss_checkpoints
        total = checkpoints[-1]
        proc = start_daemon(self.daemon_env())
        points: dict[int, float] = {}
        try:
            await proc.wait_ready()
            await self.fresh_queues()
            fed, batch, k = 0, 5000, 0
            scopes = cycle(self.args.scopes)
            started = time.monotonic()
            while len(points) < len(checkpoints):
                done = int(proc.metric("jlm_requests_total"))
                for c in checkpoints:
                    if c not in points and done >= c:
                        points[c] = proc.rss_mib()
                        self.log(f"rss after {c:,} requests: {points[c]:.1f} MiB")
                backlog = await self.amqp.count(REQUESTS)
                if backlog < batch and fed < total:
                    k += 1
                    m = min(batch, total - fed)
                    await self.amqp.preload(self.requests(m, scopes, f"rss{k}"), window=1000)
                    fed += m
                if await self.amqp.count(REPLIES) > 20_000:
                    await self.amqp.purge(REPLIES, JOB_QUEUE)
                if not proc.alive():
                    raise RuntimeError("daemon exited during the RSS run")
                await asyncio.sleep(0.2)
            self.log(f"rss run: {total:,} requests in {time.monotonic() - started:.0f}s")
        finally:
            await proc.stop()
            await self.fresh_queues()
        self.results["rss"] = points


def cycle(n: int) -> Iterator[int]:
    i = 0
    while True:
        yield i % n
        i += 1


def fmt_cpu(cpu: dict[str, float], rate: float = 0.0) -> str:
    text = " ".join(f"{k} {v * 100:.0f}%" for k, v in cpu.items())
    if rate:
        text += " | ms cpu/req " + " ".join(f"{k} {v / rate * 1e3:.2f}" for k, v in cpu.items())
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=50_000, help="requests per pass (50,000)")
    p.add_argument("--reps", type=int, default=3, help="passes per measurement; medians quoted")
    p.add_argument("--scope-reps", type=int, default=0, help="passes at 1 and 1M scopes (--reps)")
    p.add_argument("--scopes", type=int, default=1000, help="scopes of the main pass (1,000)")
    p.add_argument("--big-scopes", type=int, default=1_000_000, help="pre-populated scopes")
    p.add_argument("--latency-seconds", type=float, default=15.0)
    p.add_argument("--prefetch", type=int, default=0, help="daemon prefetch (default: its own)")
    p.add_argument("--relay-prefetch", type=int, default=0, help="(default: the daemon's)")
    p.add_argument("--quick", action="store_true", help="5,000 requests, 1 pass, 100k scopes")
    p.add_argument("--soak", action="store_true", help="RSS up to 1,000,000 requests")
    p.add_argument(
        "--celery", action="store_true", help="also Celery's apply_async ([bench] extra)"
    )
    p.add_argument(
        "--only",
        default="relay,contract,daemon,latency,scopes,rss",
        help="phases to run, comma-separated (latency needs daemon)",
    )
    p.add_argument("--redis-db", type=int, default=None, help="default: the highest empty DB")
    p.add_argument("--profile", default="", help="py-spy the first 1k-scope daemon pass to FILE")
    p.add_argument("--profile-seconds", type=int, default=10)
    p.add_argument(
        "--baseline",
        default="",
        help="DIR holding another `jlm` package: each daemon pass also runs it, for A/B",
    )
    p.add_argument("--no-append", action="store_true", help="print the table, skip RESULTS.md")
    p.add_argument("--note", default="", help="a line saved with the table (what changed)")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.reps, args.big_scopes = 5000, 1, 100_000
        args.latency_seconds = 5.0
    if args.soak:
        args.rss_checkpoints = [100_000, 250_000, 500_000, 750_000, 1_000_000]
    elif args.quick:
        args.rss_checkpoints = [10_000, 20_000]
    else:
        args.rss_checkpoints = [50_000, 100_000]
    return args


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    phases = args.phases = set(args.only.split(",")) | ({"celery"} if args.celery else set())
    env = BenchEnv()
    await env.open(args.redis_db)
    started = datetime.now(UTC)
    load_start = loadavg()
    try:
        settings = load_settings(env.daemon_env(0))
        if not args.relay_prefetch:
            args.relay_prefetch = args.prefetch or settings.prefetch
        await declare(settings)
        redis = aioredis.Redis.from_url(env.redis_url)
        async with Amqp(env.amqp_url) as amqp:
            bench = Bench(args, env, settings, amqp, redis, ServerCpu())
            bench.log(f"vhost {env.vhost}, redis db {env.redis_db}, namespace {env.namespace}")
            if phases & {"relay", "contract", "daemon"}:
                await bench.throughput()
            if "latency" in phases and "daemon" in bench.results:
                await bench.latency()
            if "scopes" in phases:
                await bench.scopes()
            await bench.keyspace()
            if "rss" in phases:
                await bench.rss()
            info = {
                "date": started.strftime("%Y-%m-%d %H:%M UTC"),
                "machine": machine(),
                "versions": await asyncio.to_thread(versions, env.redis_url),
                "load": f"{load_start} at start, {loadavg()} at end",
                "args": args,
                "prefetch": args.prefetch or settings.prefetch,
            }
            await redis.aclose()
        table = report.render(bench.results, info)
        print(table)
        if not args.no_append:
            report.append(table)
    finally:
        await env.close()
    return 0


def entry() -> None:
    sys.exit(uvloop.run(main()))


if __name__ == "__main__":
    entry()
