"""Small helpers to look into the broker from tests."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from jlm.config import Settings


async def drain_queue(settings: Settings, queue: str, *, timeout: float = 2.0) -> list[Any]:
    """Get every message now in a queue (acking them)."""
    out: list[AbstractIncomingMessage] = []
    conn = await aio_pika.connect(settings.amqp_urls[0])
    async with conn:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        idle = 0.0
        while idle < timeout:
            msg = await q.get(fail=False)
            if msg is None:
                await asyncio.sleep(0.05)
                idle += 0.05
                continue
            idle = 0.0
            await msg.ack()
            out.append(msg)
    return out


async def queue_exists(settings: Settings, queue: str) -> bool:
    conn = await aio_pika.connect(settings.amqp_urls[0])
    async with conn:
        ch = await conn.channel()
        try:
            await ch.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return False
        return True


async def events_on(
    conn: AbstractConnection, *, idle: float = 1.0, limit: float = 90.0, prefetch: int = 1000
) -> list[dict[str, Any]]:
    """Every event in jlm.provenance, oldest first, on an open connection: read until no event
    came for `idle` seconds; failing if the stream does not go quiet within `limit` seconds."""
    events: list[dict[str, Any]] = []
    ch = await conn.channel()
    await ch.set_qos(prefetch_count=prefetch)
    q = await ch.get_queue("jlm.provenance", ensure=False)
    loop = asyncio.get_running_loop()
    last = loop.time()

    async def on(msg: AbstractIncomingMessage) -> None:
        nonlocal last
        last = loop.time()
        events.append(orjson.loads(msg.body))
        await msg.ack()

    await q.consume(on, arguments={"x-stream-offset": "first"})
    deadline = loop.time() + limit
    while loop.time() - last < idle:
        assert loop.time() < deadline, "the event stream never went quiet"
        await asyncio.sleep(0.1)
    await ch.close()
    return events


async def read_stream(settings: Settings, *, idle: float = 1.0) -> list[dict[str, Any]]:
    """Every event in jlm.provenance, oldest first."""
    async with await aio_pika.connect(settings.amqp_urls[0]) as conn:
        return await events_on(conn, idle=idle)


async def tap(ch: AbstractChannel, exchange: str, key: str) -> AbstractQueue:
    """A private queue that gets a copy of what `exchange` routes with `key`."""
    queue = await ch.declare_queue("", exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key=key)
    return queue


async def rpc(
    ch: AbstractChannel,
    replies: AbstractQueue,
    op: str,
    body: dict[str, Any],
    headers: dict[str, Any] | None = None,
) -> AbstractIncomingMessage:
    """One request and its reply message (headers and all)."""
    correlation_id = uuid.uuid4().hex
    exchange = await ch.get_exchange("jlm.requests", ensure=False)
    await exchange.publish(
        aio_pika.Message(
            orjson.dumps(body),
            content_type="application/json",
            message_id=uuid.uuid4().hex,
            correlation_id=correlation_id,
            reply_to=replies.name,
            headers=headers or {},
        ),
        routing_key=op,
    )
    async with asyncio.timeout(20):
        while True:
            message = await replies.get(fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            await message.ack()
            if message.correlation_id == correlation_id:
                return message


async def take(queue: AbstractQueue, n: int, timeout: float = 30) -> list[AbstractIncomingMessage]:
    out: list[AbstractIncomingMessage] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            await message.ack()
            out.append(message)
    return out
