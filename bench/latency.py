"""Latency at a fixed offered load: an open-loop publisher and a consumer of what comes out."""

from __future__ import annotations

import asyncio
import time

import aiormq

from bench.amqp import REQUESTS, now_iso, properties, request_body

TICK = 0.002


async def measure(
    url: str,
    out_queue: str,
    *,
    rate: float,
    seconds: float,
    scopes: int,
    run: str,
    warmup: float = 1.0,
) -> list[float]:
    """Publish `rate` requests/s for warmup + seconds; return publish→out latencies (s).

    The index of each request travels in its correlation_id (echoed in the daemon's reply) and
    its message_id (copied by the relay onto its output), so both sides are read the same way.
    Requests sent during the warm-up are not counted.
    """
    conn = await aiormq.connect(url)
    pub = await conn.channel(publisher_confirms=False)
    sub = await conn.channel(publisher_confirms=False)
    await sub.basic_qos(prefetch_count=5000)
    sent_at: list[float] = []
    got: list[tuple[int, float]] = []

    async def on_message(msg: aiormq.abc.DeliveredMessage) -> None:
        now = time.perf_counter()
        p = msg.header.properties
        ident = p.correlation_id or p.message_id or ""
        got.append((int(ident.rsplit("-", 1)[1]), now))

    await sub.basic_consume(out_queue, on_message, no_ack=True)
    start = time.perf_counter()
    total = int(rate * (warmup + seconds))
    i = 0
    try:
        while i < total:
            due = min(total, int(rate * (time.perf_counter() - start)) + 1)
            while i < due:
                ident = f"{run}-{i:08d}"
                sent_at.append(time.perf_counter())
                await pub.basic_publish(
                    request_body(i % scopes, i, now_iso()),
                    exchange=REQUESTS,
                    routing_key="manage",
                    properties=properties(ident, ident, reply=True),
                    wait=False,
                )
                i += 1
            await asyncio.sleep(TICK)
        deadline = time.perf_counter() + 30
        while len(got) < total and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    if len(got) < total:
        raise RuntimeError(f"latency: {total - len(got)} of {total} never came out")
    first = int(rate * warmup)
    return [t - sent_at[idx] for idx, t in got if idx >= first]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]
