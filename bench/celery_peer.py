"""Celery's side of the comparison: `apply_async` with publisher confirms, on the same broker.

What a user who picks Celery instead of the daemon runs for each request: one `apply_async`
(a persistent task message, the broker's confirm awaited: kombu's `confirm_publish`) with no
deduplication, no state, no reply. One publisher thread, as a request handler calls it. Run as
a subprocess by `bench.run` (phase `celery`, the optional `[bench]` extra installs Celery):

    python -m bench.celery_peer --url amqp://guest:guest@127.0.0.1:5672/VHOST --requests 50000

It declares its queue (`bench.celery`, durable) on the vhost of the URL, publishes, and prints
one JSON line: requests, the rate between 10 % and 90 % of the publishes (start-up and tail
excluded, as for the daemon's passes), and the process's CPU seconds in that window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from typing import Any

from bench.procs import ROOT, ServerCpu

QUEUE = "bench.celery"


def app_for(url: str) -> Any:
    from celery import Celery  # the optional `[bench]` extra: only the subprocess needs it

    app = Celery("bench", broker=url)
    app.conf.update(
        broker_transport_options={"confirm_publish": True},
        task_ignore_result=True,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
    )
    return app


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def publish(url: str, n: int) -> dict[str, Any]:
    app = app_for(url)

    @app.task(name="bench.render")
    def render(user: int, report: str, fmt: str) -> None:  # never run here: only published
        del user, report, fmt

    marks: dict[str, tuple[float, float]] = {}
    lo, hi = n // 10, n * 9 // 10
    with app.producer_or_acquire() as producer:
        for i in range(n):
            if i in (lo, hi):
                marks["lo" if i == lo else "hi"] = (time.monotonic(), cpu_seconds())
            # The payload of the daemon bench's requests (bench.amqp.request_body).
            render.apply_async((i, "monthly", "pdf"), producer=producer)
    wall = marks["hi"][0] - marks["lo"][0]
    return {
        "requests": n,
        "rate": (hi - lo) / wall,
        "cpu": (marks["hi"][1] - marks["lo"][1]) / wall,
    }


async def run_pass(amqp_url: str, n: int, servers: ServerCpu) -> tuple[float, dict[str, float]]:
    """One pass in a subprocess: (requests/s, CPU share of a core by process). The servers' CPU
    is taken over the whole pass (start-up included), Celery's over its 10-90 % window."""
    before, started = servers.seconds(), time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.celery_peer",
        "--url",
        amqp_url,
        "--requests",
        str(n),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench.celery_peer exited {proc.returncode} (is Celery installed?)")
    wall = time.monotonic() - started
    result = json.loads(out)
    cpu = {"celery": float(result["cpu"])}
    for name, secs in servers.seconds().items():
        cpu[name] = (secs - before.get(name, secs)) / wall
    return float(result["rate"]), cpu


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.celery_peer")
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=50_000)
    args = parser.parse_args()
    print(json.dumps(publish(args.url, args.requests)), flush=True)


if __name__ == "__main__":
    main()
