"""The bare relay: consume `jlm.requests` → publish to a priority queue with confirms → ack.

The ceiling the daemon is measured against. Same client (aio-pika), same connection settings
(`jlm.broker.connect_first`), same channel layout (a consume channel with a prefetch, a confirmed
publish channel), same event loop (uvloop); concurrency comes, as in the daemon, from aio-pika
running each delivery's callback as its own task, so up to `prefetch` publishes await their
confirms at once. Run as a subprocess by `bench.run`: `python -m bench.relay --prefetch N`.

`--contract` makes it publish, per request, what the contract makes the daemon publish (the job,
`job.superseded` and `job.enqueued` to the audit stream, the reply) without deciding anything:
the ceiling for the daemon's message pattern on this broker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import uuid
from typing import Any

import aio_pika
import orjson
import uvloop
from aio_pika.abc import AbstractIncomingMessage

from bench.amqp import RELAY_KEY
from jlm.broker import EVENTS, JOBS, JSON, REQUESTS, connect_first
from jlm.config import load_settings


def _event(kind: str, body: bytes) -> bytes:
    """About the size and shape of a daemon event carrying this request."""
    return orjson.dumps(
        {
            "provenance_id": str(uuid.uuid4()),
            "type": kind,
            "status": "pending",
            "at": "2026-11-28T12:00:00.123456Z",
            "agent": {"id": "job-lifecycle-manager", "version": "0"},
            "metadata": {"input": orjson.loads(body), "output": {"success": True}},
        }
    )


async def relay(prefetch: int, echo: bool, contract: bool) -> None:
    settings = load_settings(dict(os.environ))
    conn = await connect_first(settings, "bench relay")
    consume_ch = await conn.channel(publisher_confirms=False)
    await consume_ch.set_qos(prefetch_count=prefetch)
    publish_ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
    reply_ch = await conn.channel(publisher_confirms=False)
    jobs = await publish_ch.get_exchange(JOBS, ensure=False)
    events = await publish_ch.get_exchange(EVENTS, ensure=False)
    queue = await consume_ch.get_queue(REQUESTS, ensure=False)

    def persistent(body: bytes, **kw: Any) -> aio_pika.Message:
        return aio_pika.Message(
            body, content_type=JSON, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **kw
        )

    async def on_message(message: AbstractIncomingMessage) -> None:
        job = persistent(message.body, message_id=message.message_id, priority=5)
        if not contract:
            await jobs.publish(job, RELAY_KEY, mandatory=True)
        else:
            # What the daemon publishes for a supersede, minus the decision: the job, two
            # events to the audit stream (all confirmed, concurrently), then the reply.
            await asyncio.gather(
                jobs.publish(job, RELAY_KEY, mandatory=True),
                *(
                    events.publish(persistent(_event(k, message.body), type=k), k, mandatory=True)
                    for k in ("job.superseded", "job.enqueued")
                ),
            )
            if message.reply_to:
                await reply_ch.default_exchange.publish(
                    aio_pika.Message(message.body, correlation_id=message.correlation_id),
                    message.reply_to,
                    mandatory=False,
                )
        if echo and message.reply_to:
            # For the latency phase only: like the daemon's reply, once the publish is confirmed.
            await reply_ch.default_exchange.publish(
                aio_pika.Message(b"{}", content_type=JSON, correlation_id=message.correlation_id),
                message.reply_to,
                mandatory=False,
            )
        await message.ack()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await queue.consume(on_message)
    print("relay consuming", flush=True)
    await stop.wait()
    await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay")
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--echo", action="store_true", help="answer reply_to after the confirm")
    parser.add_argument(
        "--contract", action="store_true", help="publish what the daemon does: job, 2 events, reply"
    )
    args = parser.parse_args()
    uvloop.run(relay(args.prefetch, args.echo, args.contract))


if __name__ == "__main__":
    main()
