"""The Jepsen-style ledger of a scenario: what was sent, acked, answered, decided and published.

Every figure is read back from the servers themselves after the daemons stopped:
- decisions: the request records in Redis (`<ns>:{tag}:req:<message_id>:<actor>`), one per
  decided id;
- duplicated decisions: a message_id that produced more than one job hash (each job hash names its
  request id), or more than one decision event (distinct `provenance_id` per request id);
- jobs published: distinct job ids (AMQP message_id) in the job queues;
- lost: a request with no decision, or no reply, or whose enqueued job is in no job queue while it
  can still run.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage
from tests.amqp_helpers import events_on

LINES: list[str] = []  # printed in the terminal summary (tests/faults/conftest.py)


@dataclass
class Accounting:
    scenario: str
    sent: int = 0
    acked: int = 0
    replied: int = 0
    decisions: int = 0
    jobs_published: int = 0
    lost: int = 0
    duplicated_decisions: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        core = (
            f"sent={self.sent} acked={self.acked} replied={self.replied} "
            f"decisions={self.decisions} jobs_published={self.jobs_published} "
            f"lost={self.lost} duplicated_decisions={self.duplicated_decisions}"
        )
        more = " ".join(f"{k}={v}" for k, v in self.extra.items())
        return f"[{self.scenario}] {core}" + (f" {more}" if more else "")

    def report(self) -> None:
        text = self.line()
        LINES.append(text)
        print("\n" + text, flush=True)


async def scan(client: Any, pattern: str) -> list[bytes]:
    return [k async for k in client.scan_iter(match=pattern, count=2000)]


async def request_records(client: Any, namespace: str) -> dict[str, dict[str, Any]]:
    """message_id -> the facts recorded by its decision."""
    keys = await scan(client, f"{namespace}:*:req:*")
    out: dict[str, dict[str, Any]] = {}
    for chunk in _chunks(keys, 500):
        pipe = client.pipeline(transaction=False)
        for k in chunk:
            pipe.hget(k, "f")
        values = await pipe.execute()
        for key, value in zip(chunk, values, strict=True):
            if value is not None:
                # <ns>:{tag}:req:<message_id>:<actor digest>
                message_id = key.decode().split(":req:", 1)[1].rsplit(":", 1)[0]
                out[message_id] = orjson.loads(value)
    return out


async def job_hashes(client: Any, namespace: str) -> dict[str, dict[str, str]]:
    """job id -> its hash fields."""
    keys = [k for k in await scan(client, f"{namespace}:{{*}}:job:*") if not k.endswith(b":h")]
    out: dict[str, dict[str, str]] = {}
    for chunk in _chunks(keys, 500):
        pipe = client.pipeline(transaction=False)
        for k in chunk:
            pipe.hgetall(k)
        values = await pipe.execute()
        for key, fields in zip(chunk, values, strict=True):
            job_id = key.decode().rsplit(":job:", 1)[1]
            out[job_id] = {k.decode(): v.decode() for k, v in fields.items()}
    return out


def _chunks(items: list[Any], n: int) -> list[list[Any]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


async def drain(amqp_url: str, queue: str, *, idle: float = 1.5) -> list[AbstractIncomingMessage]:
    """Consume (and ack) every message now in a queue; [] if the queue does not exist."""
    out: list[AbstractIncomingMessage] = []
    conn = await aio_pika.connect(amqp_url)
    async with conn:
        ch = await conn.channel()
        try:
            q = await ch.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return []
        await ch.set_qos(prefetch_count=2000)
        loop = asyncio.get_running_loop()
        last = loop.time()

        async def on(msg: AbstractIncomingMessage) -> None:
            nonlocal last
            last = loop.time()
            out.append(msg)
            await msg.ack()

        await q.consume(on)
        while loop.time() - last < idle:
            await asyncio.sleep(0.1)
    return out


async def queue_count(amqp_url: str, queue: str) -> int:
    """Messages ready in a queue (after its consumers stopped, that is all it holds)."""
    conn = await aio_pika.connect(amqp_url)
    async with conn:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        return int(q.declaration_result.message_count or 0)


async def stream_events(
    amqp_url: str, *, idle: float = 1.5, limit: float = 90.0
) -> list[dict[str, Any]]:
    """Every event in jlm.provenance, oldest first (read until idle, at most `limit` s)."""
    async with await aio_pika.connect(amqp_url) as conn:
        return await events_on(conn, idle=idle, limit=limit, prefetch=2000)


@dataclass
class Evidence:
    """What the servers hold after a scenario."""

    records: dict[str, dict[str, Any]]
    jobs: dict[str, dict[str, str]]
    job_messages: list[str]  # AMQP message_id of every job message, duplicates included
    events: list[dict[str, Any]]

    @property
    def published(self) -> set[str]:
        return set(self.job_messages)

    def jobs_by_request(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for job_id, fields in self.jobs.items():
            out[fields.get("request_id", "?")].append(job_id)
        return out

    def decision_events_by_request(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = defaultdict(set)
        for e in self.events:
            if e["type"] in ("job.enqueued", "job.deduplicated"):
                out[e["request_id"]].add(e["provenance_id"])
        return out

    def duplicated(self, ids: set[str]) -> set[str]:
        """Request ids with more than one job or more than one decision event."""
        by_job = {r for r, jobs in self.jobs_by_request().items() if len(jobs) > 1}
        by_event = {r for r, pids in self.decision_events_by_request().items() if len(pids) > 1}
        return (by_job | by_event) & ids

    def lost(self, ids: set[str], replied: set[str]) -> set[str]:
        """Requests with no decision, no reply, or an enqueued job that reached no job queue
        although it can still run (a job cancelled before any publish of it need not be sent:
        a redelivered decision publishes its job again only while it is pending)."""
        lost = {i for i in ids if i not in self.records or i not in replied}
        for i in ids & self.records.keys():
            facts = self.records[i]
            job = facts.get("job")
            cancelled = self.jobs.get(job, {}).get("state") == "cancelled"
            if facts.get("d") == "enqueued" and job not in self.published and not cancelled:
                lost.add(i)
        return lost


async def collect(
    amqp_url: str,
    redis_client: aioredis.Redis | Any,
    namespace: str,
    job_queues: list[str],
    *,
    events: bool = True,
) -> Evidence:
    t0 = time.monotonic()
    records = await request_records(redis_client, namespace)
    jobs = await job_hashes(redis_client, namespace)
    t1 = time.monotonic()
    messages: list[str] = []
    for queue in job_queues:
        messages.extend(m.message_id or "?" for m in await drain(amqp_url, queue))
    t2 = time.monotonic()
    evs = await stream_events(amqp_url) if events else []
    t3 = time.monotonic()
    print(f"collect: redis {t1 - t0:.1f}s, job queues {t2 - t1:.1f}s, stream {t3 - t2:.1f}s")
    return Evidence(records, jobs, messages, evs)


def account(
    scenario: str,
    ids: set[str],
    replies: dict[str, list[dict[str, Any]]],
    evidence: Evidence,
    left_in_queue: int,
    **extra: Any,
) -> Accounting:
    replied = {i for i in ids if replies.get(i)}
    acc = Accounting(
        scenario,
        sent=len(ids),
        acked=len(ids) - left_in_queue,
        replied=len(replied),
        decisions=len(ids & evidence.records.keys()),
        jobs_published=len(evidence.published),
        lost=len(evidence.lost(ids, replied)),
        duplicated_decisions=len(evidence.duplicated(ids)),
    )
    repeats = Counter(evidence.job_messages)
    acc.extra["job_messages"] = len(evidence.job_messages)
    acc.extra["republished"] = sum(n - 1 for n in repeats.values())
    acc.extra.update(extra)
    return acc


def unequal_replies(replies: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Ids answered more than once with different replies (idempotency says: equal JSON)."""
    return {i: rs for i, rs in replies.items() if any(r != rs[0] for r in rs[1:])}
