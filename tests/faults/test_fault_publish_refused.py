"""Scenario 5: the broker cannot take a decision's job message.

- Unroutable: the job queue is deleted while the daemon runs (its binding goes with it), and the
  `jlm.jobs` exchange itself is deleted. The daemon declares again and publishes.
- Refused: the job queue is full and refuses publishes (`x-overflow: reject-publish`). The daemon
  declares job queues with `x-max-priority` only; a queue declared beforehand with other arguments
  would make that declaration fail (PRECONDITION_FAILED), so the limit comes from a policy on the
  test's vhost (`max-length: 1`, `overflow: reject-publish`), as an operator would set it.

In every case the request is not acked and not answered while the job is not in a queue, its
retries are counted (`jlm_request_retries_total{dependency="rabbitmq"}`), no event claims the
job was enqueued, and once the cause is gone the request completes with the decided job.
"""

from __future__ import annotations

import asyncio
import subprocess

import aio_pika
import pytest
import redis.asyncio as aioredis
from tests.faults.conftest import DaemonFactory
from tests.faults.load import Publisher, manage_request
from tests.support.daemon import DaemonProcess, metric
from tests.support.ledger import account, collect, drain, queue_count, stream_events

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

HELD = 3.0  # seconds a blocked request is watched: not acked, not answered, retried


def rabbitmqctl(*args: str) -> str:
    out = subprocess.run(
        ["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return out.stdout


def unacked(vhost: str, queue: str) -> int:
    for line in rabbitmqctl(
        "list_queues",
        "-p",
        vhost,
        "--quiet",
        "--no-table-headers",
        "name",
        "messages_unacknowledged",
    ).splitlines():
        name, _, count = line.rpartition("\t")
        if name == queue:
            return int(count)
    raise AssertionError(f"no queue {queue}")


async def retries(daemon: DaemonProcess) -> float:
    return metric(await daemon.metrics(), "jlm_request_retries_total", dependency="rabbitmq")


async def enqueued_events(amqp_url: str, job_id: str) -> int:
    events = await stream_events(amqp_url, idle=1.0)
    return sum(1 for e in events if e["type"] == "job.enqueued" and e["job_id"] == job_id)


async def held(pub: Publisher, daemon: DaemonProcess, vhost: str, message_id: str) -> float:
    """Watch a blocked request: never answered, still unacked, retried; return the retries."""
    before = await retries(daemon)
    await asyncio.sleep(HELD)
    assert message_id not in pub.replies, "answered while its job is in no queue"
    assert unacked(vhost, "jlm.requests") == 1
    after = await retries(daemon)
    assert after > before, "the blocked request was not retried"
    return after - before


async def admin(amqp_url: str, action: str, name: str) -> None:
    conn = await aio_pika.connect(amqp_url)
    async with conn:
        ch = await conn.channel()
        if action == "delete_queue":
            await ch.queue_delete(name)
        else:
            await ch.exchange_delete(name)


async def test_unroutable_job_queue_and_exchange_deleted(
    spawn: DaemonFactory,
    amqp_url: str,
    vhost: str,
    shared_redis: aioredis.Redis,
    namespace: str,
) -> None:
    job_type = "fault-gone"
    queue = f"jlm.jobs.{job_type}"
    daemon = spawn("d", amqp_url).start()
    await daemon.wait_ready()
    reqs = [manage_request(f"u{i}", job_type, f"s{i}") for i in range(3)]
    async with Publisher(amqp_url, "unroutable") as pub:
        await pub.send_all(reqs[:1])
        assert not await pub.wait_replies({"u0"}, 30)
        taken = [m.message_id or "" for m in await drain(amqp_url, queue, idle=0.5)]  # a worker
        # 1. The job queue is deleted (and its binding with it) behind the daemon's back.
        await admin(amqp_url, "delete_queue", queue)
        before = await retries(daemon)
        await pub.send_all(reqs[1:2])
        assert not await pub.wait_replies({"u1"}, 30)
        queue_retries = await retries(daemon) - before
        # 2. The jobs exchange is deleted: publishing to it is a channel error.
        await admin(amqp_url, "delete_exchange", "jlm.jobs")
        before = await retries(daemon)
        await pub.send_all(reqs[2:])
        assert not await pub.wait_replies({"u2"}, 30), daemon.tail()
        exchange_retries = await retries(daemon) - before
        replies = dict(pub.replies)
    assert all(replies[r.message_id][0]["success"] for r in reqs)
    assert await daemon.terminate() == 0
    evidence = await collect(amqp_url, shared_redis, namespace, [queue])
    evidence.job_messages += taken
    # The jobs decided while their route was missing are there, once.
    for r in reqs[1:]:
        assert evidence.job_messages.count(replies[r.message_id][0]["new_job_id"]) == 1
    acc = account(
        "5a unroutable (queue deleted, exchange deleted)",
        {r.message_id for r in reqs},
        replies,
        evidence,
        await queue_count(amqp_url, "jlm.requests"),
        queue_deleted_retries=int(queue_retries),
        exchange_deleted_retries=int(exchange_retries),
    )
    acc.report()
    assert queue_retries >= 1
    assert exchange_retries >= 1
    assert acc.duplicated_decisions == 0
    assert acc.lost == 0
    assert acc.decisions == acc.sent == acc.replied == acc.acked


async def test_job_queue_refuses_publishes(
    spawn: DaemonFactory,
    amqp_url: str,
    vhost: str,
    shared_redis: aioredis.Redis,
    namespace: str,
) -> None:
    job_type = "fault-full"
    queue = f"jlm.jobs.{job_type}"
    rabbitmqctl(
        "set_policy",
        "-p",
        vhost,
        "--apply-to",
        "queues",
        "jlm-fault-full",
        f"^{queue.replace('.', '[.]')}$",
        '{"max-length": 1, "overflow": "reject-publish"}',
    )
    daemon = spawn("d", amqp_url).start()
    await daemon.wait_ready()
    reqs = [manage_request(f"q{i}", job_type, f"s{i}") for i in range(2)]
    early: list[str] = []
    async with Publisher(amqp_url, "refused") as pub:
        await pub.send_all(reqs[:1])
        assert not await pub.wait_replies({"q0"}, 30)
        await pub.send_all(reqs[1:])  # its job finds the queue full
        refused_retries = await held(pub, daemon, vhost, "q1")
        decided = (await collect(amqp_url, shared_redis, namespace, [])).records["q1"]
        assert await enqueued_events(amqp_url, decided["job"]) == 0, "an event claims it enqueued"
        assert await daemon.ready()
        # The cause goes away: a worker takes the job that fills the queue.
        early = [m.message_id or "" for m in await drain(amqp_url, queue, idle=0.5)]
        assert not await pub.wait_replies({"q1"}, 30)
        replies = dict(pub.replies)
    assert replies["q1"][0]["new_job_id"] == decided["job"]
    assert await daemon.terminate() == 0
    evidence = await collect(amqp_url, shared_redis, namespace, [queue])
    evidence.job_messages += early
    assert await enqueued_events(amqp_url, decided["job"]) == 1
    acc = account(
        "5b job queue refuses publishes (reject-publish)",
        {r.message_id for r in reqs},
        replies,
        evidence,
        await queue_count(amqp_url, "jlm.requests"),
        refused_retries=int(refused_retries),
        held_s=HELD,
    )
    acc.report()
    assert acc.lost == 0
    assert acc.duplicated_decisions == 0
    assert acc.decisions == acc.sent == acc.replied == acc.acked
