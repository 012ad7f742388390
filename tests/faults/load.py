"""Publishers of a request load: confirmed sends with message_id, and every reply they get back."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from tests.support.requests import REQUESTS, request_message, rfc3339


@dataclass(frozen=True, slots=True)
class Sent:
    """One request as its publisher sent it."""

    message_id: str
    op: str
    body: dict[str, Any]
    requested_at: str | None = None
    scope: str | None = None


def manage_request(
    message_id: str,
    job_type: str,
    scope: str,
    *,
    at: datetime | None = None,
    payload: dict[str, Any] | None = None,
) -> Sent:
    body: dict[str, Any] = {
        "job_type": job_type,
        "cache_prefix": scope,
        "payload": payload if payload is not None else {"id": message_id},
    }
    requested_at = rfc3339(at) if at is not None else None
    if requested_at is not None:
        body["requested_at"] = requested_at
    return Sent(message_id, "manage", body, requested_at, scope)


def spread_times(n: int, seed_order: list[int]) -> list[datetime]:
    """Unique requested_at values, 1 ms apart, in the order `seed_order` gives (a permutation)."""
    base = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    return [base + timedelta(milliseconds=rank) for rank in seed_order[:n]]


@dataclass
class Publisher:
    """One publisher connection: confirmed publishes, an exclusive reply queue, replies by id."""

    amqp_url: str
    name: str = "publisher"
    window: int = 200
    declare: bool = True  # declare jlm.requests (classic) so requests can wait for a daemon
    server_named_replies: bool = False  # amq.gen-* (what the default reply_to grant allows)
    replies: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    sent: list[Sent] = field(default_factory=list)
    _conn: AbstractConnection | None = None
    _channel: AbstractChannel | None = None
    _reply_queue: str = ""
    arrived: dict[str, float] = field(default_factory=dict)  # first reply's wall-clock time
    _got_one: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> Publisher:
        self._conn = await aio_pika.connect(
            self.amqp_url, client_properties={"connection_name": self.name}
        )
        self._channel = await self._conn.channel(publisher_confirms=True)
        await self._channel.set_qos(prefetch_count=1000)
        name = (
            "" if self.server_named_replies else f"fault-replies-{self.name}-{uuid.uuid4().hex[:8]}"
        )
        queue = await self._channel.declare_queue(name, exclusive=True, auto_delete=True)
        self._reply_queue = queue.name
        await queue.consume(self._on_reply, no_ack=True)
        if self.declare:
            await self.declare_requests()
        return self

    async def declare_requests(self) -> None:
        """The request exchange and queue as the daemon declares them, so requests can wait."""
        assert self._channel is not None
        exchange = await self._channel.declare_exchange(
            REQUESTS, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await self._channel.declare_queue(
            REQUESTS, durable=True, arguments={"x-dead-letter-exchange": "jlm.dead"}
        )
        await queue.bind(exchange, "#")

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        key = message.correlation_id or "?"
        self.arrived.setdefault(key, time.time())
        self.replies[key].append(orjson.loads(message.body))
        self._got_one.set()

    async def publish_raw(
        self,
        op: str,
        body: bytes,
        *,
        correlation_id: str,
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
        user_id: str | None = None,
        content_type: str | None = "application/json",
    ) -> None:
        """One confirmed publish of arbitrary bytes; the reply is filed under correlation_id."""
        assert self._channel is not None
        exchange = await self._channel.get_exchange(REQUESTS, ensure=False)
        await exchange.publish(
            request_message(
                body,
                content_type=content_type,
                message_id=message_id,
                correlation_id=correlation_id,
                reply_to=self._reply_queue,
                headers=headers,
                user_id=user_id,
            ),
            routing_key=op,
        )

    async def send_all(self, requests: list[Sent], *, pace: float = 0.0) -> None:
        """Publish in windows of confirmed messages (each request's reply is filed by its id)."""
        for start in range(0, len(requests), self.window):
            batch = requests[start : start + self.window]
            await asyncio.gather(
                *(
                    self.publish_raw(
                        r.op,
                        orjson.dumps(r.body),
                        correlation_id=r.message_id,
                        message_id=r.message_id,
                    )
                    for r in batch
                )
            )
            self.sent.extend(batch)
            if pace:
                await asyncio.sleep(pace)

    async def wait_replies(self, ids: set[str], timeout: float) -> set[str]:
        """Wait until every id has a reply, or the timeout; return the ids still unanswered."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            missing = {i for i in ids if i not in self.replies}
            left = deadline - asyncio.get_running_loop().time()
            if not missing or left <= 0:
                return missing
            self._got_one.clear()
            try:
                await asyncio.wait_for(self._got_one.wait(), min(left, 1.0))
            except TimeoutError:
                pass
