"""A small RPC client for the request exchange: what `jlm submit/status/...` and tests use."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from aiormq.exceptions import ChannelNotFoundEntity

from jlm.amqp.connect import connect_first
from jlm.amqp.names import REQUESTS
from jlm.config import Settings


class Client:
    """Publishes requests to `jlm.requests` and waits for the daemon's replies."""

    def __init__(self, settings: Settings, *, user_id: str | None = None) -> None:
        """`user_id`, when given, is set on every request (the broker checks it is ours)."""
        self._settings = settings
        self._conn: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._replies: AbstractQueue | None = None
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._user = user_id

    async def __aenter__(self) -> Client:
        self._conn = await connect_first(self._settings, "jlm client")
        self._channel = await self._conn.channel(publisher_confirms=True)
        self._replies = await self._channel.declare_queue("", exclusive=True, auto_delete=True)
        await self._replies.consume(self._on_reply, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        fut = self._waiting.pop(message.correlation_id or "", None)
        if fut is not None and not fut.done():
            fut.set_result(orjson.loads(message.body))

    async def consumers(self) -> int | None:
        """How many consumers `jlm.requests` has (a passive declare); None when it does not
        exist, i.e. no daemon ever ran on this virtual host."""
        assert self._conn is not None
        channel = await self._conn.channel()
        try:
            queue = await channel.declare_queue(REQUESTS, passive=True)
            return queue.declaration_result.consumer_count or 0
        except ChannelNotFoundEntity:
            return None
        finally:
            if not channel.is_closed:
                await channel.close()

    async def send(
        self,
        op: str,
        body: dict[str, Any] | bytes,
        *,
        message_id: str | None = None,
        wait: bool = True,
        user_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> asyncio.Future[dict[str, Any]] | None:
        """Publish one request (confirmed); return a future of its reply when `wait`."""
        assert self._channel is not None
        assert self._replies is not None
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        correlation_id = uuid.uuid4().hex
        fut: asyncio.Future[dict[str, Any]] | None = None
        if wait:
            fut = asyncio.get_running_loop().create_future()
            self._waiting[correlation_id] = fut
        exchange = await self._channel.get_exchange(REQUESTS, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                raw,
                content_type="application/json",
                message_id=message_id or uuid.uuid4().hex,
                correlation_id=correlation_id,
                reply_to=self._replies.name if wait else None,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                user_id=user_id or self._user,
                headers=headers,
            ),
            routing_key=op,
        )
        return fut

    async def call(
        self,
        op: str,
        body: dict[str, Any] | bytes,
        *,
        timeout: float = 30.0,
        **kwargs: Any,
    ) -> dict[str, Any]:
        fut = await self.send(op, body, wait=True, **kwargs)
        assert fut is not None
        return await asyncio.wait_for(fut, timeout)


def url_user(settings: Settings) -> str | None:
    """The user name in the first broker URL: what RabbitMQ will accept as `user_id`."""
    user = urlsplit(settings.amqp_urls[0]).username
    return unquote(user) if user else None


def url_vhost(settings: Settings) -> str:
    """The virtual host of the first broker URL."""
    path = urlsplit(settings.amqp_urls[0]).path
    return unquote(path[1:]) if len(path) > 1 else "/"
