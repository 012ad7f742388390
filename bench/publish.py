"""Micro-benchmark of one confirmed publish, the two ways the daemon has published.

    python -m bench.publish [--messages 20000] [--rounds 5]

`aio-pika`: `aio_pika.Message` + `Exchange.publish` (the daemon before; the bare relay now).
`aiormq`: prebuilt `Basic.Properties` + `aiormq.Channel.basic_publish(wait=False)` (the daemon
now). Each round publishes the same persistent messages, 256 awaiting their confirms at once, to
a priority queue on a fresh vhost, and reads this process's CPU time (`time.process_time`): the
client's cost per publish, which other load on the machine disturbs far less than a rate.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
import uvloop
from pamqp.commands import Basic

from bench.env import BenchEnv

QUEUE = "bench.publish"
BODY = b'{"job_id": "x", "job_type": "bench.render", "payload": {"user": 1}}' * 3


async def rounds(url: str, n: int, count: int) -> dict[str, list[float]]:
    conn = await aio_pika.connect(url)
    ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
    q = await ch.declare_queue(QUEUE, durable=True, arguments={"x-max-priority": 10})
    ex = ch.default_exchange
    raw = await ch.get_underlay_channel()
    assert isinstance(raw, aiormq.Channel)

    async def with_aio_pika(i: int) -> None:
        msg = aio_pika.Message(
            BODY,
            content_type="application/json",
            message_id=str(i),
            priority=5,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await ex.publish(msg, QUEUE, mandatory=True)

    async def with_aiormq(i: int) -> None:
        props = Basic.Properties(
            content_type="application/json",
            headers={},
            delivery_mode=2,
            priority=5,
            message_id=str(i),
        )
        await raw.basic_publish(
            BODY, routing_key=QUEUE, properties=props, mandatory=True, wait=False
        )

    async def one(publish: Callable[[int], Awaitable[None]]) -> float:
        sem = asyncio.Semaphore(256)

        async def bounded(i: int) -> None:
            async with sem:
                await publish(i)

        cpu = time.process_time()
        await asyncio.gather(*(bounded(i) for i in range(n)))
        spent = time.process_time() - cpu
        await q.purge()
        return spent / n * 1e6

    out: dict[str, list[float]] = {"aio-pika": [], "aiormq": []}
    for _ in range(count):
        out["aio-pika"].append(await one(with_aio_pika))
        out["aiormq"].append(await one(with_aiormq))
    await conn.close()
    return out


async def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.publish")
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    env = BenchEnv()
    await env.open(None)
    try:
        out = await rounds(env.amqp_url, args.messages, args.rounds)
    finally:
        await env.close()
    for name, values in out.items():
        runs = ", ".join(f"{v:.0f}" for v in values)
        print(f"{name:9} {statistics.median(values):6.1f} µs CPU per publish (runs {runs})")


if __name__ == "__main__":
    uvloop.run(main())
