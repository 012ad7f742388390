"""The bench's one table, printed and appended to bench/RESULTS.md."""

from __future__ import annotations

import os
import statistics
from typing import Any

from bench.latency import percentile

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _runs(runs: list[Any]) -> str:
    return ", ".join(f"{r.rate:,.0f}" for r in runs)


def _cpu(runs: list[Any]) -> str:
    """Median share of a core, and CPU milliseconds per request, by process."""
    names = list(runs[0].cpu) if runs else []
    return ", ".join(
        f"{n} {_med([r.cpu[n] for r in runs]) * 100:.0f}% "
        f"({_med([r.cpu[n] / r.rate for r in runs]) * 1e3:.2f} ms/req)"
        for n in names
    )


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def render(results: dict[str, Any], info: dict[str, Any]) -> str:  # noqa: C901 one table, one branch per optional figure
    args = info["args"]
    n = args.requests
    rows: list[tuple[str, str, str]] = []
    relay = results.get("relay", [])
    daemon = results.get("daemon", [])
    relay_rate = _med([r.rate for r in relay])
    daemon_rate = _med([r.rate for r in daemon])
    if relay:
        rows.append(
            (
                "(a) bare relay, requests/s",
                f"**{relay_rate:,.0f}**",
                f"runs {_runs(relay)}; cpu {_cpu(relay)}",
            )
        )
    if daemon:
        ratio = daemon_rate / relay_rate if relay else float("nan")
        rows.append(
            (
                f"(b) daemon `manage`, {args.scopes:,} scopes, requests/s",
                f"**{daemon_rate:,.0f}**",
                f"runs {_runs(daemon)}; cpu {_cpu(daemon)}",
            )
        )
        if relay:
            rows.append(
                ("daemon / relay", f"**{ratio:.2f}**", f"target ≥ 0.80: {_verdict(ratio >= 0.8)}")
            )
    base = results.get("baseline", [])
    if base and daemon:
        b_rate = _med([r.rate for r in base])
        rows.append(
            (
                f"A/B: baseline daemon (`{args.baseline}`), same passes interleaved",
                f"{b_rate:,.0f}",
                f"runs {_runs(base)}; cpu {_cpu(base)}; (b) / baseline: "
                f"**{daemon_rate / b_rate:.2f}**",
            )
        )
    contract = results.get("contract", [])
    if contract:
        c_rate = _med([r.rate for r in contract])
        rows.append(
            (
                "(a2) contract relay: job + 2 events + reply per request, no decision",
                f"{c_rate:,.0f}",
                f"runs {_runs(contract)}; cpu {_cpu(contract)}; daemon / this: "
                f"**{daemon_rate / c_rate:.2f}**; this / relay: {c_rate / relay_rate:.2f}",
            )
        )
    celery = results.get("celery", [])
    if celery:
        c_rate = _med([r.rate for r in celery])
        ratio = daemon_rate / c_rate
        rows.append(
            (
                "(a3) Celery `apply_async`, publisher confirms, one thread, same broker, no dedup",
                f"{c_rate:,.0f}",
                f"runs {_runs(celery)}; cpu {_cpu(celery)}; daemon / Celery: **{ratio:.2f}**; "
                f"target ≥ 1.5: {_verdict(ratio >= 1.5)}",
            )
        )
    if "latency" in results:
        rate = results["latency_rate"]
        d = results["latency"]["daemon"]
        r = results["latency"]["relay"]
        d99, r99 = percentile(d, 99), percentile(r, 99)
        rows.append(
            (
                f"(c) daemon latency at {rate:,.0f}/s (½ max), publish → reply",
                f"p50 {percentile(d, 50) * 1e3:.1f} ms, p99 **{d99 * 1e3:.1f} ms**",
                f"{len(d):,} samples over {args.latency_seconds:.0f} s",
            )
        )
        rows.append(
            (
                f"relay latency at {rate:,.0f}/s, publish → its reply (sent after the confirm)",
                f"p50 {percentile(r, 50) * 1e3:.1f} ms, p99 **{r99 * 1e3:.1f} ms**",
                f"p99 ratio **{d99 / r99:.2f}**; target ≤ 2: {_verdict(d99 <= 2 * r99)}",
            )
        )
        c = results["latency"].get("contract")
        if c:
            c99 = percentile(c, 99)
            rows.append(
                (
                    f"contract relay latency at {rate:,.0f}/s, publish → its reply (after the "
                    "job's confirm, then the events')",
                    f"p50 {percentile(c, 50) * 1e3:.1f} ms, p99 **{c99 * 1e3:.1f} ms**",
                    f"daemon p99 / this: **{d99 / c99:.2f}**; target ≤ 2: "
                    f"{_verdict(d99 <= 2 * c99)}",
                )
            )
    if "scope1" in results:
        one = _med([r.rate for r in results["scope1"]])
        rows.append(
            (
                "(d) daemon, 1 scope, requests/s",
                f"{one:,.0f}",
                f"runs {_runs(results['scope1'])}; cpu {_cpu(results['scope1'])}",
            )
        )
    if daemon:
        rows.append(
            (f"daemon, {args.scopes:,} scopes, requests/s", f"{daemon_rate:,.0f}", "as (b)")
        )
    if "scope_big" in results:
        big = _med([r.rate for r in results["scope_big"]])
        ratio = big / daemon_rate if daemon else float("nan")
        rows.append(
            (
                f"daemon, {args.big_scopes:,} live scopes, requests/s",
                f"{big:,.0f}",
                f"runs {_runs(results['scope_big'])}; cpu {_cpu(results['scope_big'])}; "
                f"/ {args.scopes:,}-scope: **{ratio:.2f}**; "
                f"within 10 %: {_verdict(ratio >= 0.9)}",
            )
        )
    passes = [*daemon, *results.get("scope1", []), *results.get("scope_big", [])]
    if passes:
        per = [p.extra["evalsha"] / n for p in passes]
        cmds = [p.extra["commands"] / n for p in passes]
        scripts = [p.extra["scripts"] / n for p in passes]
        rows.append(
            (
                "(e) Redis round trips per request (EVALSHA+EVAL calls / requests)",
                f"**{_med(per):.3f}**",
                f"all commands {_med(cmds):.3f}/request (server-wide: other clients add to it); "
                f"daemon's own script calls {_med(scripts):.3f}/request",
            )
        )
    if "scope_memory" in results:
        rows.append(
            (
                "Redis memory per live scope",
                f"{results['scope_memory']:,.0f} B",
                f"used_memory delta over {args.big_scopes:,} scopes; "
                f"{results['scope_keys']:.2f} keys each (scope, job, history, request record)",
            )
        )
    if "keys" in results:
        keys, expiring, sampled, without = results["keys"]
        rows.append(
            (
                "keys with a TTL",
                f"{expiring:,} of {keys:,}",
                f"RANDOMKEY sample: {sampled - without} of {sampled} with TTL > 0; "
                f"every key expires: {_verdict(keys == expiring and without == 0)}",
            )
        )
    if "rss" in results:
        pts = results["rss"]
        first, last = min(pts), max(pts)
        growth = pts[last] / pts[first] - 1
        rows.append(
            (
                f"(f) daemon RSS after {first:,} / {last:,} requests",
                f"{pts[first]:.1f} / {pts[last]:.1f} MiB",
                f"growth {growth * 100:+.1f} %; flat within 10 %: {_verdict(abs(growth) <= 0.10)}; "
                + ", ".join(f"{k:,}: {v:.1f}" for k, v in sorted(pts.items())),
            )
        )
    v = info["versions"]
    m = info["machine"]
    head = [
        f"### {info['date']}" + (f": {args.note}" if args.note else ""),
        "",
        f"- machine: {m['nproc']} cores ({m['cpu']}), {m['memory']}, Linux {m['kernel']}; "
        f"load average {info['load']}",
        f"- versions: Python {v['python']}, aio-pika {v['aio-pika']} (aiormq {v['aiormq']}), "
        f"redis-py {v['redis']}, orjson {v['orjson']}, uvloop {v['uvloop']}; RabbitMQ "
        f"{v['rabbitmq']} (OTP {v['erlang']}), Redis {v['redis-server']}; "
        f"jlm {v['job-lifecycle-manager']}",
        f"- {n:,} pre-loaded requests per pass, {args.reps} passes each (medians); prefetch "
        f"{info['prefetch']} (daemon), {args.relay_prefetch} (relay)"
        + ("; **--quick**: not a result" if args.quick else ""),
        "",
        "| measure | value | notes |",
        "| --- | --- | --- |",
    ]
    body = [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(head + body) + "\n"


def append(table: str) -> None:
    new = not os.path.exists(RESULTS)
    with open(RESULTS, "a", encoding="utf-8") as f:
        if new:
            f.write("# Benchmark results\n\nAppended by `make bench` (`python -m bench.run`).\n\n")
        f.write("\n" + table)
