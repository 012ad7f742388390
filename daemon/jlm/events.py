"""Reading the provenance stream (`jlm events`)."""

from __future__ import annotations

import asyncio

import orjson
from aio_pika.abc import AbstractIncomingMessage

from jlm.broker import PROVENANCE, connect_first
from jlm.config import Settings

IDLE_SECONDS = 1.5


async def print_events(settings: Settings, *, follow: bool, as_json: bool) -> int:
    """Print what the stream holds, oldest first; with `follow`, keep printing new events.

    A stream never says "that was the last one" over AMQP, so without `--follow` reading stops
    once no event has arrived for IDLE_SECONDS.
    """
    conn = await connect_first(settings, "jlm events")
    loop = asyncio.get_running_loop()
    quiet = asyncio.Event()
    timer: asyncio.TimerHandle | None = None

    def rearm() -> None:
        nonlocal timer
        if timer is not None:
            timer.cancel()
        if not follow:
            timer = loop.call_later(IDLE_SECONDS, quiet.set)

    async with conn:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=500)
        queue = await channel.declare_queue(PROVENANCE, passive=True)

        async def on_event(message: AbstractIncomingMessage) -> None:
            rearm()
            print(message.body.decode() if as_json else _line(message.body), flush=True)
            await message.ack()

        rearm()
        await queue.consume(on_event, arguments={"x-stream-offset": "first"})
        await quiet.wait()
    return 0


def _line(body: bytes) -> str:
    try:
        e = orjson.loads(body)
        scope = e.get("scope") or {}
        where = f"{scope.get('cache_prefix')}/{scope.get('job_type')}" if scope else "-"
        return (
            f"{e.get('at')}  {e.get('type'):<18} {e.get('status'):<10} "
            f"{e.get('job_id') or '-':<43} {where}  actor={e.get('actor') or '-'}"
        )
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return body.decode(errors="replace")
