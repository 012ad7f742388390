"""`python -m bench.instances`: decisions/s with 1, 2 and 3 daemon instances on this machine.

    python -m bench.instances                  # sizing, then 10,000 requests x 3 runs per count
    python -m bench.instances --quick          # 3,000 requests, 1 run, 2,000 sizing scopes
    python -m bench.instances --instances 1,2,4 --requests 40000 --reps 5
    python -m bench.instances --only throughput --json out.json

Throughput: a fresh vhost and an empty Redis DB with its own namespace (removed at the end); for
each instance count and run, `--requests` `manage` requests (policy replace, 1,000 scopes, each
with message_id, reply_to and requested_at) are pre-loaded into `jlm.requests`, then N `jlm run`
processes are started together and the replies are counted. The rate is taken between the moment
every instance answers /readyz (or 10 % of the replies, if later) and 90 %: start-up and tail
excluded. The median of the runs is quoted, with the CPU used per request by the daemons, the
broker and Redis in that window (from /proc: other users of the shared servers add to those).

Sizing: one daemon on a private redis-server (so that INFO memory sees nothing else) decides one
request on each of `--sizing-scopes` new scopes, then a second one on each (a supersede); the
used_memory deltas give the bytes per live scope and per further job. The events of those
decisions are then read back from `jlm.provenance` for their average size, and the stream's
directory under the broker's data dir (when readable) for the bytes on disk per event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiormq
import redis.asyncio as aioredis
import uvloop
from tests.support.ports import free_port

from bench.amqp import (
    JOB_QUEUE,
    REPLIES,
    Amqp,
    declare,
    message_ids,
    now_iso,
    properties,
    request_body,
)
from bench.env import BenchEnv, loadavg, machine
from bench.procs import Proc, ServerCpu, start_daemon
from jlm.amqp.names import REQUESTS
from jlm.config import load_settings

RABBIT_DATA = "/var/lib/rabbitmq/mnesia/rabbit@localhost"


def ready(proc: Proc) -> bool:
    try:
        url = f"http://127.0.0.1:{proc.metrics_port}/readyz"
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def cycle(n: int) -> Iterator[int]:
    i = 0
    while True:
        yield i % n
        i += 1


class Runner:
    def __init__(self, args: argparse.Namespace, env: BenchEnv, amqp: Amqp) -> None:
        self.args = args
        self.env = env
        self.amqp = amqp
        self.servers = ServerCpu()

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} load {loadavg()}] {msg}", flush=True)

    async def preload(self, n: int, scopes: Iterator[int], run: str, *, idle: bool = True) -> None:
        """Publish n requests (confirmed); with `idle`, check that no one consumed any yet."""
        await self.amqp.purge(REQUESTS, REPLIES)
        with contextlib.suppress(aiormq.exceptions.AMQPError):
            await self.amqp.purge(JOB_QUEUE)  # declared by the daemon on first use
        ident = message_ids(run, n)
        at = now_iso()
        bodies = (
            (request_body(next(scopes), i, at), properties(ident(i), ident(i), reply=True))
            for i in range(n)
        )
        await self.amqp.preload(bodies)
        queued = await self.amqp.count(REQUESTS)
        if idle and queued != n:
            raise RuntimeError(f"pre-load: {queued} queued, expected {n}")

    def daemons(self, n: int, **env: str) -> list[Proc]:
        procs = []
        for i in range(n):
            proc = start_daemon(self.env.daemon_env(free_port(), **env))
            proc.name = f"daemon{i + 1}"
            procs.append(proc)
        return procs

    async def wait_replies(
        self,
        target: int,
        procs: list[Proc],
        on_sample: Callable[[float, int, bool], None] | None = None,
    ) -> list[tuple[float, int, bool]]:
        """(time, replies, all ready) samples until `target` replies; each also to `on_sample`."""
        samples: list[tuple[float, int, bool]] = []
        all_ready = False
        last, last_change = -1, time.monotonic()
        while True:
            if not all_ready:
                states = await asyncio.gather(*(asyncio.to_thread(ready, p) for p in procs))
                all_ready = all(states)
            count = await self.amqp.count(REPLIES)
            now = time.monotonic()
            samples.append((now, count, all_ready))
            if on_sample is not None:
                on_sample(now, count, all_ready)
            if count != last:
                last, last_change = count, now
            if count >= target:
                return samples
            if now - last_change > 60:
                raise RuntimeError(f"stuck at {count}/{target} replies")
            if not all(p.alive() for p in procs):
                raise RuntimeError(f"a daemon exited at {count}/{target} replies")
            await asyncio.sleep(0.02)

    async def measured_run(self, n_inst: int, k: int) -> dict[str, Any]:
        """One run, with the CPU seconds of every process over the rate window."""
        n = self.args.requests
        await self.preload(n, cycle(self.args.scopes), f"i{n_inst}r{k}")
        procs = self.daemons(n_inst)
        cpu_lo: dict[str, float] = {}
        cpu_hi: dict[str, float] = {}

        def cpu() -> dict[str, float]:
            out = self.servers.seconds()
            out["daemons"] = sum(p.cpu_seconds() for p in procs if p.alive())
            return out

        def snapshot(now: float, count: int, all_ready: bool) -> None:
            nonlocal cpu_lo, cpu_hi
            if not cpu_lo and all_ready and count >= 0.1 * n:
                cpu_lo = cpu() | {"t": now, "n": count}
            if not cpu_hi and count >= 0.9 * n:
                cpu_hi = cpu() | {"t": now, "n": count}

        try:
            await self.wait_replies(n, procs, snapshot)
        finally:
            codes = [await p.stop() for p in procs]
        if not cpu_lo or not cpu_hi or cpu_hi["n"] <= cpu_lo["n"]:
            raise RuntimeError(
                f"{n_inst} instance(s): the instances were not all ready before 90 % of the "
                "requests were done; use more --requests"
            )
        tally = await self.amqp.drain_replies(n)
        jobs = await self.amqp.count(JOB_QUEUE)
        if tally.get("ok") != n or jobs != n or any(codes):
            raise RuntimeError(f"run {n_inst}x#{k}: replies {tally}, jobs {jobs}, exits {codes}")
        done = cpu_hi["n"] - cpu_lo["n"]
        wall = cpu_hi["t"] - cpu_lo["t"]
        result = {"rate": done / wall, "requests_in_window": done, "seconds": wall}
        for name in ("daemons", "rabbitmq", "redis"):
            if name in cpu_hi:
                result[f"{name}_cpu_ms_per_req"] = 1000 * (cpu_hi[name] - cpu_lo[name]) / done
                result[f"{name}_cores"] = (cpu_hi[name] - cpu_lo[name]) / wall
        self.log(
            f"{n_inst} instance(s) run {k}: {result['rate']:,.0f} requests/s; cores used: "
            + ", ".join(
                f"{name} {result[name + '_cores']:.2f}"
                for name in ("daemons", "rabbitmq", "redis")
                if name + "_cores" in result
            )
        )
        return result

    async def throughput(self) -> dict[int, list[dict[str, Any]]]:
        out: dict[int, list[dict[str, Any]]] = {n: [] for n in self.args.instances}
        # Interleaved (1, 2, 3, 1, 2, 3, ...): a change of background load hits every count.
        for k in range(1, self.args.reps + 1):
            for n_inst in self.args.instances:
                out[n_inst].append(await self.measured_run(n_inst, k))
        return out

    async def sizing(self) -> dict[str, Any]:
        scopes = self.args.sizing_scopes
        with tempfile.TemporaryDirectory(prefix="jlm-sizing-") as tmp:
            server, port = start_redis(tmp)
            redis_url = f"redis://127.0.0.1:{port}/0"
            client = aioredis.Redis.from_url(redis_url)
            try:
                await wait_redis(client)
                (proc,) = self.daemons(1, JLM_REDIS_URL=redis_url)
                try:
                    await self.preload(1, iter([10_000_000]), "warm", idle=False)
                    await self.wait_replies(1, [proc])
                    mem = [await used_memory(client)]
                    keys = [await client.dbsize()]
                    for round_ in (1, 2):
                        await self.preload(scopes, iter(range(scopes)), f"size{round_}", idle=False)
                        await self.wait_replies(scopes, [proc])
                        mem.append(await used_memory(client))
                        keys.append(await client.dbsize())
                    usage = await key_usage(client, self.env.namespace)
                finally:
                    await proc.stop()
            finally:
                await client.aclose()
                server.terminate()
                server.wait(10)
        events, body_bytes = await read_stream(self.env.amqp_url)
        disk = stream_disk_bytes(self.env.vhost)
        result = {
            "scopes": scopes,
            "bytes_per_live_scope": (mem[1] - mem[0]) / scopes,
            "keys_per_live_scope": (keys[1] - keys[0]) / scopes,
            "bytes_per_further_job": (mem[2] - mem[1]) / scopes,
            "keys_per_further_job": (keys[2] - keys[1]) / scopes,
            "memory_usage_by_key": usage,
            "events": events,
            "event_body_bytes": body_bytes / max(events, 1),
            "stream_disk_bytes": disk,
            "disk_bytes_per_event": (disk / events) if disk and events else None,
        }
        self.log(
            f"sizing: {result['bytes_per_live_scope']:.0f} B per live scope, "
            f"{result['bytes_per_further_job']:.0f} B per further job; {events} events of "
            f"{result['event_body_bytes']:.0f} B on average"
        )
        return result


def start_redis(workdir: str) -> tuple[subprocess.Popen[bytes], int]:
    """A private redis-server (no persistence) on a free loopback port."""
    port = free_port()
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    argv += ["--appendonly", "no", "--dir", workdir]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL), port


async def wait_redis(client: aioredis.Redis, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.ping()
            return
        except (OSError, aioredis.ConnectionError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def used_memory(client: aioredis.Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


async def key_usage(client: aioredis.Redis, namespace: str) -> dict[str, float]:
    """Average MEMORY USAGE per kind of key, over a sample of each kind."""
    kinds: dict[str, list[int]] = {}
    async for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        name = key.decode()
        kind = name.split("}:", 1)[1].split(":", 1)[0]
        if kind == "job" and name.endswith(":h"):
            kind = "job history"
        sample = kinds.setdefault(kind, [])
        if len(sample) < 200:
            sample.append(int(await client.memory_usage(key, samples=0) or 0))
    return {kind: statistics.mean(v) for kind, v in sorted(kinds.items()) if v}


async def read_stream(amqp_url: str, idle: float = 2.0) -> tuple[int, int]:
    """(events, bytes of their bodies) in jlm.provenance."""
    conn = await aiormq.connect(amqp_url)
    count = size = 0
    loop = asyncio.get_running_loop()
    last = loop.time()
    try:
        ch = await conn.channel()
        await ch.basic_qos(prefetch_count=2000)

        async def on(msg: aiormq.abc.DeliveredMessage) -> None:
            nonlocal count, size, last
            count += 1
            size += len(msg.body)
            last = loop.time()
            assert msg.delivery_tag is not None
            await ch.basic_ack(msg.delivery_tag)

        await ch.basic_consume("jlm.provenance", on, arguments={"x-stream-offset": "first"})
        while loop.time() - last < idle:
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    return count, size


def stream_disk_bytes(vhost: str) -> int | None:
    """Bytes of this vhost's jlm.provenance segments and indexes (None when not readable)."""
    root = Path(RABBIT_DATA) / "stream"
    try:
        dirs = [d for d in root.iterdir() if d.name.startswith(f"{vhost}_jlm_provenance_")]
        return sum(f.stat().st_size for d in dirs for f in d.iterdir()) if dirs else None
    except OSError:
        return None


def median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs if key in r))


def render(results: dict[str, Any], info: dict[str, Any]) -> str:
    lines = [
        f"## bench.instances, {info['date']}",
        "",
        f"{info['machine']}; load {info['load']}; {info['requests']:,} requests per run over "
        f"{info['scopes']:,} scopes, median of {info['reps']} run(s)",
        "",
    ]
    through = results.get("throughput")
    if through:
        base = median(through[min(through)], "rate")
        lines += [
            "| instances | requests/s | vs 1 | runs (requests/s) | cores: daemons | rabbitmq"
            " | redis | CPU ms per request: daemons | rabbitmq | redis |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n, runs in through.items():
            rate = median(runs, "rate")
            row = [
                str(n),
                f"{rate:,.0f}",
                f"{rate / base:.2f}x",
                " / ".join(f"{r['rate']:,.0f}" for r in runs),
            ]
            for what in ("cores", "cpu_ms_per_req"):
                for name in ("daemons", "rabbitmq", "redis"):
                    key = f"{name}_{what}"
                    row.append(f"{median(runs, key):.2f}" if any(key in r for r in runs) else "-")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    size = results.get("sizing")
    if size:
        disk = size["disk_bytes_per_event"]
        lines += [
            f"Sizing over {size['scopes']:,} scopes (private redis-server):",
            f"- Redis: {size['bytes_per_live_scope']:.0f} B per live scope "
            f"({size['keys_per_live_scope']:.2f} keys), {size['bytes_per_further_job']:.0f} B "
            f"per further job ({size['keys_per_further_job']:.2f} keys)",
            "- MEMORY USAGE per key: "
            + ", ".join(f"{k} {v:.0f} B" for k, v in size["memory_usage_by_key"].items()),
            f"- provenance: {size['events']:,} events, {size['event_body_bytes']:.0f} B of body "
            "on average"
            + (f", {disk:.0f} B on disk per event" if disk else ", stream files not readable"),
            "",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.instances", description=__doc__.split("\n")[0]
    )
    p.add_argument("--instances", default="1,2,3", help="instance counts (1,2,3)")
    p.add_argument("--requests", type=int, default=10_000, help="requests per run (10,000)")
    p.add_argument("--reps", type=int, default=3, help="runs per instance count; medians quoted")
    p.add_argument("--scopes", type=int, default=1000, help="scopes of the throughput runs")
    p.add_argument("--sizing-scopes", type=int, default=10_000, help="scopes of the sizing run")
    p.add_argument("--only", default="sizing,throughput", help="phases, comma-separated")
    p.add_argument("--redis-db", type=int, default=None, help="default: the highest empty DB")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--quick", action="store_true", help="3,000 requests, 1 run, 2,000 scopes")
    args = p.parse_args(argv)
    args.instances = [int(x) for x in args.instances.split(",")]
    if args.quick:
        args.requests, args.reps, args.sizing_scopes = 3000, 1, 2000
    return args


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("redis-server") is None and "sizing" in args.only:
        raise SystemExit("bench.instances: the sizing phase needs redis-server on PATH")
    phases = set(args.only.split(","))
    env = BenchEnv()
    await env.open(args.redis_db)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = loadavg()
    results: dict[str, Any] = {}
    try:
        await declare(load_settings(env.daemon_env(0)))
        async with Amqp(env.amqp_url) as amqp:
            runner = Runner(args, env, amqp)
            runner.log(f"vhost {env.vhost}, redis db {env.redis_db}, namespace {env.namespace}")
            if "sizing" in phases:
                results["sizing"] = await runner.sizing()
            if "throughput" in phases:
                results["throughput"] = await runner.throughput()
    finally:
        await env.close()
    m = machine()
    info = {
        "date": started,
        "machine": f"{m['nproc']} x {m['cpu']}, {m['memory']}, host {socket.gethostname()}",
        "load": f"{load_start} -> {loadavg()}",
        "requests": args.requests,
        "scopes": args.scopes,
        "reps": args.reps,
    }
    print(render(results, info))
    if args.json:
        write_json(args.json, {"info": info, "results": results})
    return 0


def write_json(path: str, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
