"""AMQP helpers of the bench: topology, pre-loading requests, counting queues, reading replies."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import aiormq
import orjson
from pamqp.commands import Basic

from jlm.amqp.names import JOBS, REQUESTS
from jlm.broker import Broker
from jlm.config import Settings
from jlm.metrics import Metrics

JOB_TYPE = "bench.render"
RELAY_KEY = "bench.relay"
RELAY_OUT = "bench.relay.out"
REPLIES = "bench.replies"
JOB_QUEUE = f"jlm.jobs.{JOB_TYPE}"


def scope_name(scope: int) -> str:
    return f"tenant-{scope:07d}"


def request_body(scope: int, n: int, requested_at: str) -> bytes:
    """A `manage` request like `jlm submit` sends: policy replace, a small payload."""
    return orjson.dumps(
        {
            "job_type": JOB_TYPE,
            "payload": {"user": n, "report": "monthly", "format": "pdf"},
            "cache_prefix": scope_name(scope),
            "priority": 5,
            "policy": "replace",
            "requested_at": requested_at,
        }
    )


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def properties(message_id: str, correlation_id: str | None, reply: bool) -> Basic.Properties:
    """The properties `jlm.client.Client.send` sets on a request."""
    return Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        message_id=message_id,
        correlation_id=correlation_id,
        reply_to=REPLIES if reply else None,
    )


async def declare(settings: Settings) -> None:
    """The daemon's own topology (declared by its code), plus the bench's reply and relay queues."""
    broker = Broker(settings, Metrics())
    await broker.open()
    await broker.close()
    conn = await aiormq.connect(settings.amqp_url)
    try:
        ch = await conn.channel()
        await ch.queue_declare(REPLIES, durable=False)
        await ch.queue_declare(RELAY_OUT, durable=True, arguments={"x-max-priority": 10})
        await ch.queue_bind(RELAY_OUT, JOBS, routing_key=RELAY_KEY)
    finally:
        await conn.close()


class Amqp:
    """One bench connection: a confirmed publishing channel and a channel for queue counts."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: aiormq.abc.AbstractConnection | None = None
        self.pub: aiormq.abc.AbstractChannel | None = None
        self.raw: aiormq.abc.AbstractChannel | None = None
        self.ctl: aiormq.abc.AbstractChannel | None = None

    async def __aenter__(self) -> Amqp:
        self.conn = await aiormq.connect(self.url)
        self.pub = await self.conn.channel(publisher_confirms=True)
        self.raw = await self.conn.channel(publisher_confirms=False)
        self.ctl = await self.conn.channel(publisher_confirms=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.conn is not None:
            await self.conn.close()

    async def count(self, queue: str) -> int:
        assert self.ctl is not None
        ok = await self.ctl.queue_declare(queue, passive=True)
        return int(ok.message_count or 0)

    async def purge(self, *queues: str) -> None:
        assert self.ctl is not None
        for q in queues:
            try:
                await self.ctl.queue_purge(q)
            except aiormq.exceptions.ChannelNotFoundEntity:
                self.ctl = await self.conn.channel(publisher_confirms=False)  # type: ignore[union-attr]

    async def preload(
        self, bodies: Iterable[tuple[bytes, Basic.Properties]], window: int = 2000
    ) -> int:
        """Publish requests to `jlm.requests` with confirms, `window` at a time; all are queued."""
        assert self.pub is not None
        pending: list[asyncio.Future[object]] = []
        sent = 0
        for body, props in bodies:
            pending.append(
                asyncio.ensure_future(
                    self.pub.basic_publish(
                        body, exchange=REQUESTS, routing_key="manage", properties=props
                    )
                )
            )
            sent += 1
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending.clear()
        if pending:
            await asyncio.gather(*pending)
        return sent

    async def drain_replies(self, expected: int, timeout: float = 60.0) -> dict[str, int]:
        """Read the replies of a run; count successes and error codes."""
        assert self.conn is not None
        ch = await self.conn.channel(publisher_confirms=False)
        await ch.basic_qos(prefetch_count=2000)
        tally: dict[str, int] = {}
        done = asyncio.get_running_loop().create_future()
        seen = 0

        def on_reply(msg: aiormq.abc.DeliveredMessage) -> None:
            nonlocal seen
            reply = orjson.loads(msg.body)
            key = "ok" if reply.get("success") else reply.get("error", {}).get("code", "?")
            tally[key] = tally.get(key, 0) + 1
            seen += 1
            if seen >= expected and not done.done():
                done.set_result(None)

        async def on_message(msg: aiormq.abc.DeliveredMessage) -> None:
            on_reply(msg)

        await ch.basic_consume(REPLIES, on_message, no_ack=True)
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError:
            tally["missing"] = expected - seen
        await ch.close()
        return tally


def message_ids(run: str, n: int) -> Callable[[int], str]:
    prefix = f"{run}-{uuid.uuid4().hex[:6]}-"
    return lambda i: f"{prefix}{i:08d}"


async def wait_count(
    amqp: Amqp,
    queue: str,
    target: int,
    *,
    alive: Callable[[], bool],
    poll: float = 0.02,
    stall: float = 60.0,
) -> list[tuple[float, int]]:
    """Poll a queue's message count until it reaches `target`; the (time, count) samples."""
    samples: list[tuple[float, int]] = []
    last_change = time.monotonic()
    last = -1
    while True:
        n = await amqp.count(queue)
        now = time.monotonic()
        samples.append((now, n))
        if n != last:
            last, last_change = n, now
        if n >= target:
            return samples
        if now - last_change > stall:
            raise RuntimeError(f"{queue}: stuck at {n}/{target} for {stall:.0f}s")
        if not alive():
            raise RuntimeError(f"the process under test exited at {n}/{target}")
        await asyncio.sleep(poll)


def steady_rate(samples: list[tuple[float, int]], target: int) -> float:
    """Messages/s between 10 % and 90 % of the target (start-up and tail excluded)."""

    def crossing(level: float) -> float:
        prev_t, prev_n = samples[0]
        for t, n in samples:
            if n >= level:
                if n == prev_n:
                    return t
                return prev_t + (t - prev_t) * (level - prev_n) / (n - prev_n)
            prev_t, prev_n = t, n
        return samples[-1][0]

    lo, hi = 0.1 * target, 0.9 * target
    return (hi - lo) / max(crossing(hi) - crossing(lo), 1e-9)
