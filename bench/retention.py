"""`python -m bench.retention`: Redis memory under superseding traffic, against the live scopes.

    python -m bench.retention            # 1,000,000 superseding requests over 1,000 scopes
    python -m bench.retention --quick    # 100,000 requests, terminal_ttl 10 s, 20,000 sizing jobs
    python -m bench.retention --quick --max-history-jobs 10    # the per-scope bound binding

Each phase runs on its own private redis-server (tests/support), so `used_memory` sees nothing but
this bench. Requests are decided by the daemon's own `manage.lua`, called with the keys and ARGV
of `Lifecycle.manage` (bench.redisstats.manage_call) in pipelines of EVALSHA: no broker and no
daemon process, so that a million decisions take a minute instead of the daemon's 1,000 requests/s
for a quarter of an hour on this machine. Requests carry no message_id (a request record lives
`idempotency_ttl`, a separate and documented cost: docs/scaling.md) and no requested_at.

Sizing (`terminal_ttl` 1 h and `max_history_jobs` above the sizing jobs per scope: nothing expires
or is deleted): `used_memory` over an empty server after one request on each scope (the live
scopes), then after `--sizing-jobs` more (each supersedes a pending job: one terminal job each,
its entry in its scope's ended set included). Retention (`terminal_ttl` = `--terminal-ttl`,
`max_history_jobs` = `--max-history-jobs`, default the daemon's): the live scopes, then
`--requests` superseding requests round-robin over them; `used_memory` and the key count right
after, then again once `terminal_ttl` has passed and Redis's active expiry has reclaimed the
expired jobs (polled until the key count is back to the live scopes' own).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from tests.support.redis_server import RedisServer

from bench import report
from bench.env import loadavg, machine
from bench.redisstats import manage_call
from jlm.config import FileConfig
from jlm.keys import Keys
from jlm.scripts import load_lua

NAMESPACE = "jlmr"
BATCH = 2000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {loadavg()}] {msg}", flush=True)


def info(client: redis.Redis) -> tuple[int, int]:
    """(used_memory, keys of DB 0)."""
    memory = int(client.info("memory")["used_memory"])
    db = client.info("keyspace").get("db0")
    return memory, int(db["keys"]) if db else 0


def send(client: redis.Redis, file: FileConfig, scopes: int, n: int, start: int = 0) -> float:
    """n `manage` requests (policy replace) round-robin over `scopes` scopes; requests/s."""
    keys = Keys(NAMESPACE)
    sha = client.script_load(load_lua("manage"))
    started = time.monotonic()
    for first in range(start, start + n, BATCH):
        pipe = client.pipeline(transaction=False)
        for i in range(first, min(first + BATCH, start + n)):
            call_keys, args = manage_call(keys, file, i % scopes, datetime.now(UTC))
            pipe.evalsha(sha, len(call_keys), *call_keys, *args)
        pipe.execute()
    return n / (time.monotonic() - started)


def on_private_redis(workdir: Path, body: Callable[[redis.Redis], dict[str, Any]]) -> Any:
    server = RedisServer(workdir).start()
    try:
        with server.client() as client:
            return body(client)
    finally:
        server.stop()


def sizing(args: argparse.Namespace, client: redis.Redis) -> dict[str, Any]:
    per_scope = -(-args.sizing_jobs // args.scopes)
    file = FileConfig(terminal_ttl=3600, max_history_jobs=per_scope + 1)
    empty, _ = info(client)
    send(client, file, args.scopes, args.scopes)
    live, live_keys = info(client)
    send(client, file, args.scopes, args.sizing_jobs, start=args.scopes)
    full, full_keys = info(client)
    out = {
        "empty": empty,
        "per_live_scope": (live - empty) / args.scopes,
        "keys_per_live_scope": live_keys / args.scopes,
        "per_terminal_job": (full - live) / args.sizing_jobs,
        "keys_per_terminal_job": (full_keys - live_keys) / args.sizing_jobs,
    }
    log(
        f"sizing: {out['per_live_scope']:.0f} B per live scope, "
        f"{out['per_terminal_job']:.0f} B per terminal job ({args.sizing_jobs:,} jobs)"
    )
    return out


def retention(args: argparse.Namespace, client: redis.Redis) -> dict[str, Any]:
    file = FileConfig(terminal_ttl=args.terminal_ttl, max_history_jobs=args.max_history_jobs)
    empty, _ = info(client)
    send(client, file, args.scopes, args.scopes)
    live, live_keys = info(client)
    log(f"{args.scopes:,} live scopes: used_memory {live:,} B ({live - empty:,} over empty)")
    rate = send(client, file, args.scopes, args.requests, start=args.scopes)
    sent = time.monotonic()
    peak, peak_keys = info(client)
    log(f"{args.requests:,} requests at {rate:,.0f}/s: {peak:,} B, {peak_keys:,} keys")
    time.sleep(args.terminal_ttl)
    deadline = time.monotonic() + args.expiry_wait
    after, after_keys = info(client)
    while after_keys > live_keys and time.monotonic() < deadline:
        time.sleep(1.0)
        after, after_keys = info(client)
    waited = time.monotonic() - sent
    log(f"{waited:.0f}s after the last request: {after:,} B, {after_keys:,} keys")
    return {
        "empty": empty,
        "live": live,
        "live_keys": live_keys,
        "rate": rate,
        "peak": peak,
        "peak_keys": peak_keys,
        "after": after,
        "after_keys": after_keys,
        "waited": waited,
    }


def render(args: argparse.Namespace, size: dict[str, Any], ret: dict[str, Any]) -> str:
    over = (ret["after"] - ret["empty"]) / max(ret["live"] - ret["empty"], 1)
    total = ret["after"] / ret["live"]
    verdict = "met" if over <= 2 else "NOT met"
    host = machine()
    where = f"{host['nproc']} x {host['cpu']}, {host['memory']}, Linux {host['kernel']}"
    versions = f"redis-server {_server_version()}, redis-py {redis.__version__}"
    lines = [
        f"### Retention ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"`python -m bench.retention{' --quick' if args.quick else ''}`)",
        "",
        f"Machine: {where}; {versions}; load {loadavg()} (shared with other work). The "
        "daemon's manage.lua driven directly in EVALSHA pipelines on a private redis-server.",
        "",
        "| figure | value |",
        "| --- | --- |",
        "| per live scope (scope hash, pending job, its history) |"
        f" {size['per_live_scope']:,.0f} B, {size['keys_per_live_scope']:.2f} keys |",
        f"| per terminal job (superseded pending job, its history, its ended-set entry) |"
        f" {size['per_terminal_job']:,.0f} B, {size['keys_per_terminal_job']:.2f} keys |",
        f"| empty server | {ret['empty']:,} B used_memory |",
        f"| {args.scopes:,} live scopes | {ret['live']:,} B ({ret['live'] - ret['empty']:,} B over"
        f" empty), {ret['live_keys']:,} keys |",
        f"| right after {args.requests:,} superseding requests ({ret['rate']:,.0f}/s),"
        f" terminal_ttl {args.terminal_ttl} s, max_history_jobs {args.max_history_jobs} |"
        f" {ret['peak']:,} B, {ret['peak_keys']:,} keys |",
        f"| {ret['waited']:.0f} s after the last request | {ret['after']:,} B,"
        f" {ret['after_keys']:,} keys |",
        f"| after / live scopes alone | **{verdict}: {over:.2f}** over the empty server"
        f" ({total:.2f} of the totals); goal ≤ 2 |",
        "",
    ]
    return "\n".join(lines)


def _server_version() -> str:
    argv = ["redis-server", "--version"]
    out = subprocess.run(argv, check=False, capture_output=True, text=True).stdout
    return out.split()[2].removeprefix("v=") if out else "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.retention", description=__doc__.split("\n")[0]
    )
    p.add_argument("--requests", type=int, default=1_000_000, help="superseding requests")
    p.add_argument("--scopes", type=int, default=1000)
    p.add_argument("--terminal-ttl", type=int, default=60, help="seconds (60)")
    p.add_argument("--sizing-jobs", type=int, default=100_000, help="terminal jobs of the sizing")
    default_kept = FileConfig().max_history_jobs
    p.add_argument(
        "--max-history-jobs",
        type=int,
        default=default_kept,
        help=f"terminal jobs kept per scope in the retention phase ({default_kept})",
    )
    p.add_argument("--expiry-wait", type=float, default=300.0, help="seconds past the TTL, at most")
    p.add_argument("--quick", action="store_true", help="100,000 requests, terminal_ttl 10 s")
    p.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.terminal_ttl, args.sizing_jobs = 100_000, 10, 20_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="jlm-retention-") as tmp:
        size = on_private_redis(Path(tmp, "sizing"), lambda c: sizing(args, c))
        ret = on_private_redis(Path(tmp, "retention"), lambda c: retention(args, c))
    table = render(args, size, ret)
    print(table)
    if args.append:
        report.append(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
