"""A publisher that survives the loss of its broker node, as a careful production publisher would.

Every request is published with a `message_id` on a channel in confirm mode. When the connection
fails, or a confirm does not come within `confirm_timeout`, or the channel refuses the window ten
times in a row, the publisher connects to the next node of its list and publishes the unconfirmed
window again with the same message ids (a single negative confirm is retried on the same
channel): the daemon's idempotency makes the repeat harmless.
Replies are read from an exclusive queue of the current connection; a reply sent to the queue of
a lost connection is gone, so `resend()` re-publishes unanswered ids, which the daemon answers
with the recorded reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)
from aiormq.exceptions import AMQPError
from tests.support.requests import REQUESTS, request_message

_FAULTS = (AMQPError, OSError, RuntimeError, TimeoutError)


@dataclass(frozen=True, slots=True)
class Request:
    message_id: str
    scope: str
    requested_at: str
    body: bytes


@dataclass
class FailoverPublisher:
    urls: list[str]
    name: str
    window: int = 100
    replies: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    confirmed: set[str] = field(default_factory=set)
    published: int = 0  # publishes, repeats included
    reconnects: int = 0
    nacked: int = 0
    confirm_timeouts: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    confirm_timeout: float = 15.0
    reply_times: list[float] = field(default_factory=list)  # time.monotonic() of each reply
    nodes_used: list[str] = field(default_factory=list)
    _next: int = 0
    _conn: AbstractConnection | None = None
    _channel: AbstractChannel | None = None
    _exchange: AbstractExchange | None = None
    _reply_queue: str = ""

    async def connect(self, timeout: float = 60.0) -> None:
        """Connect to the next node of the list that answers (round robin)."""
        await self.close()
        deadline = time.monotonic() + timeout
        while True:
            url = self.urls[self._next % len(self.urls)]
            self._next += 1
            try:
                # Every step bounded: a node going away mid-handshake must not hang the load.
                async with asyncio.timeout(15):
                    await self._open(url)
                self.nodes_used.append(url.rsplit(":", 1)[1].split("/")[0])
                return
            except _FAULTS:
                await self.close()
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def _open(self, url: str) -> None:
        self._conn = await aio_pika.connect(
            url, timeout=5, client_properties={"connection_name": self.name}
        )
        self._channel = await self._conn.channel(publisher_confirms=True)
        await self._channel.set_qos(prefetch_count=1000)
        queue = await self._channel.declare_queue(
            f"replies-{self.name}-{uuid.uuid4().hex[:8]}", exclusive=True
        )
        await queue.consume(self._on_reply, no_ack=True)
        self._exchange = await self._channel.get_exchange(REQUESTS, ensure=False)
        self._reply_queue = queue.name

    async def close(self) -> None:
        conn, self._conn, self._channel, self._exchange = self._conn, None, None, None
        if conn is not None and not conn.is_closed:
            # Closing a connection whose node died can wait for a close-ok that never comes.
            with contextlib.suppress(*_FAULTS):
                await asyncio.wait_for(conn.close(), 5)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        self.replies[message.correlation_id or "?"].append(orjson.loads(message.body))
        self.reply_times.append(time.monotonic())

    async def _publish(self, r: Request) -> None:
        assert self._exchange is not None
        await self._exchange.publish(
            request_message(
                r.body,
                message_id=r.message_id,
                correlation_id=r.message_id,
                reply_to=self._reply_queue,
            ),
            routing_key="manage",
            timeout=self.confirm_timeout,
        )
        self.published += 1
        self.confirmed.add(r.message_id)

    async def send(self, requests: list[Request], *, pace: float = 0.0) -> None:
        """Publish every request until the broker confirmed it, `window` at a time."""
        if self._conn is None:
            await self.connect()
        for start in range(0, len(requests), self.window):
            batch = requests[start : start + self.window]
            rounds = 0
            while True:
                results = await asyncio.gather(
                    *(self._publish(r) for r in batch if r.message_id not in self.confirmed),
                    return_exceptions=True,
                )
                failed = [e for e in results if isinstance(e, BaseException)]
                if not failed:
                    break
                for e in failed:
                    if not isinstance(e, _FAULTS):
                        raise e
                    self.errors[re.sub(r"\d+", "N", f"{type(e).__name__}: {str(e)[:80]}")] += 1
                timeouts = sum(isinstance(e, TimeoutError) for e in failed)
                self.confirm_timeouts += timeouts
                rounds += 1
                if self._lost() or timeouts or rounds % 10 == 0:
                    # A lost connection, a confirm that never came, or a channel that keeps
                    # refusing: give the channel up with its connection.
                    self.reconnects += 1
                    await self.connect()
                else:  # a negative confirm (e.g. a queue electing a leader): same channel, later
                    self.nacked += len(failed)
                    await asyncio.sleep(0.2)
            if pace:
                await asyncio.sleep(pace)

    async def resend(self, requests: list[Request]) -> None:
        """Publish again, same message ids, requests that got no reply (a lost reply queue)."""
        self.confirmed -= {r.message_id for r in requests}
        await self.send(requests)

    def _lost(self) -> bool:
        conn, ch = self._conn, self._channel
        return conn is None or conn.is_closed or ch is None or ch.is_closed

    def answered(self, ids: set[str]) -> set[str]:
        return {i for i in ids if self.replies.get(i)}


async def wait_answers(
    publishers: list[FailoverPublisher], requests: list[Request], timeout: float, idle: float = 10
) -> set[str]:
    """Wait until every request has a reply, or no reply came for `idle` seconds (counted from
    this call at the earliest), or the timeout; return the ids still unanswered."""
    ids = {r.message_id for r in requests}
    started = time.monotonic()
    deadline = started + timeout
    while True:
        got: set[str] = set()
        for p in publishers:
            got |= p.answered(ids)
        missing = ids - got
        last = max((p.reply_times[-1] for p in publishers if p.reply_times), default=0.0)
        last = max(last, started)
        now = time.monotonic()
        if not missing or now > deadline or now - last > idle:
            return missing
        await asyncio.sleep(0.2)
