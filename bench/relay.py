"""The bare relay: consume `jlm.requests` → publish to a priority queue with confirms → ack.

The ceiling the daemon is measured against. It is built from the daemon's own AMQP layer
(`jlm.broker.Broker`): the same connection settings, the same channel layout (a consume channel
with a prefetch, a confirmed publish channel, a reply channel), the same publish path (aiormq,
prebuilt properties, confirms awaited concurrently), the same event loop (uvloop). Concurrency
comes, as in the daemon, from aio-pika running each delivery's callback as its own task, so up to
`prefetch` publishes await their confirms at once. Run as a subprocess by `bench.run`:
`python -m bench.relay --prefetch N`.

`--contract` makes it publish, per request, what the contract makes the daemon publish for a
supersede (the job, `job.superseded` and `job.enqueued` to the audit stream, the reply) through
the daemon's own `publish_decision`, without deciding anything: the ceiling of the daemon's
message pattern on this broker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import uuid

import orjson
import uvloop
from aio_pika.abc import AbstractIncomingMessage
from pamqp.commands import Basic

from bench.amqp import RELAY_KEY, RELAY_OUT
from jlm.amqp.names import JOBS, JSON
from jlm.amqp.session import Outgoing
from jlm.broker import Broker
from jlm.config import load_settings
from jlm.metrics import Metrics
from jlm.protocol import JobMessage
from jlm.provenance import Event

AT = "2026-11-28T12:00:00.123456Z"


def _events(message: AbstractIncomingMessage) -> list[Event]:
    """About the size and shape of the two events of a daemon supersede."""
    request = orjson.loads(message.body)
    scope = {"cache_prefix": request.get("cache_prefix", "job"), "job_type": RELAY_KEY}
    job_id = uuid.uuid4().hex
    return [
        Event(str(uuid.uuid4()), kind, "pending", AT, None, message.message_id, job_id, scope,
              request, {"success": True, "new_job_id": job_id})
        for kind in ("job.superseded", "job.enqueued")
    ]  # fmt: skip


async def relay(prefetch: int, echo: bool, contract: bool) -> None:
    settings = load_settings(dict(os.environ))
    broker = Broker(settings, Metrics())
    await broker.open()

    async def on_message(message: AbstractIncomingMessage) -> None:
        if not contract:
            props = Basic.Properties(
                content_type=JSON,
                headers={},
                delivery_mode=2,
                priority=5,
                message_id=message.message_id,
            )
            out = Outgoing.of(JOBS, RELAY_KEY, message.body, props, True)
            await broker.publish_confirmed([out], set())
        else:
            request = orjson.loads(message.body)
            job = JobMessage(
                uuid.uuid4().hex, RELAY_KEY, "relay", request.get("payload", {}), 5, AT
            )
            await broker.publish_decision(job, RELAY_OUT, _events(message))
        if (echo or contract) and message.reply_to:
            # Like the daemon's reply: once the publishes are confirmed.
            await broker.reply(message.reply_to, message.correlation_id, {"success": True})
        await broker.ack(message)  # the daemon's own ack path (lean.Acks)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await broker.consume(on_message, prefetch=prefetch)
    print("relay consuming", flush=True)
    await stop.wait()
    await broker.close()


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
