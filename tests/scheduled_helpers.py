"""Watching a job queue with arrival times, for the tests of scheduled jobs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage


@dataclass(slots=True)
class Arrival:
    at: float  # time.time() when the message arrived
    body: dict[str, Any]


@dataclass
class JobWatcher:
    """Every message of a job queue from now on, with its arrival time (acked as it comes)."""

    amqp_url: str
    queue: str
    arrivals: list[Arrival] = field(default_factory=list)
    _conn: AbstractConnection | None = None

    async def __aenter__(self) -> Self:
        self._conn = await aio_pika.connect(self.amqp_url)
        ch = await self._conn.channel()
        await ch.set_qos(prefetch_count=1000)
        q = await ch.declare_queue(self.queue, durable=True, arguments={"x-max-priority": 10})

        async def on(msg: AbstractIncomingMessage) -> None:
            self.arrivals.append(Arrival(time.time(), orjson.loads(msg.body)))
            await msg.ack()

        await q.consume(on)
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._conn is not None
        await self._conn.close()

    def ids(self) -> list[str]:
        return [a.body["job_id"] for a in self.arrivals]
