"""Scenario 2: the daemon dies between the Redis decision and the publish.

The launcher (tests/faults/launcher.py) kills the process on its n-th decision, after the commit
in Redis and before the job message, the event or the reply left. The broker redelivers the request
to the next daemon; the same message_id replays the recorded decision, so the job that gets
published is the job that was decided (same job id), once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from tests.faults.conftest import DaemonFactory
from tests.faults.load import Publisher, manage_request
from tests.support.ledger import (
    account,
    collect,
    drain,
    queue_count,
    request_records,
    stream_events,
    unequal_replies,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

JOB_TYPE = "fault-crash"
CRASHES = (5, 3)  # the first run dies on its 5th decision, the second on its 3rd


async def test_crash_between_decision_and_publish(
    spawn: DaemonFactory,
    amqp_url: str,
    shared_redis: aioredis.Redis,
    namespace: str,
    tmp_path: Path,
) -> None:
    requests = [manage_request(f"c{i:03d}", JOB_TYPE, f"s{i % 6}") for i in range(30)]
    ids = {r.message_id for r in requests}
    crashed: list[dict[str, Any]] = []
    published_by_life: list[list[str]] = []  # the job messages of each daemon's life, in order
    async with Publisher(amqp_url, "crash") as pub:
        await pub.send_all(requests)
        for n, at in enumerate(CRASHES):
            report = tmp_path / f"crash{n}.json"
            d = spawn(
                f"crashing{n}",
                amqp_url,
                module="tests.faults.launcher",
                JLM_TEST_FAULT=f"crash_after_decision:{at}",
                JLM_TEST_FAULT_REPORT=str(report),
            ).start()
            assert await d.wait_exit(60) == 137, d.tail()
            facts = orjson.loads(report.read_bytes())
            crashed.append(facts)
            # The decision is committed, and its job is not in the job queue yet.
            records = await request_records(shared_redis, namespace)
            assert records[facts["request_id"]]["job"] == facts["job_id"]
            early = [m.message_id or "" for m in await drain(amqp_url, f"jlm.jobs.{JOB_TYPE}")]
            published_by_life.append(early)
            assert facts["job_id"] not in early
            if not facts["replayed"]:  # a replayed decision may have been answered before
                assert facts["request_id"] not in pub.replies
        survivor = spawn("survivor", amqp_url).start()
        await survivor.wait_ready()
        missing = await pub.wait_replies(ids, 60)
        assert not missing
        replies = dict(pub.replies)
    assert await survivor.terminate() == 0
    left = await queue_count(amqp_url, "jlm.requests")
    evidence = await collect(amqp_url, shared_redis, namespace, [f"jlm.jobs.{JOB_TYPE}"])
    published_by_life.append(list(evidence.job_messages))
    evidence.job_messages = [m for life in published_by_life for m in life]
    for facts in crashed:
        assert facts["enqueued"]
        # A redelivery publishes the very job that had been decided (its id, never a new one),
        # and one daemon's life publishes it at most once. Across a kill it may be published
        # again: a daemon killed after the confirm but before the request's ack and its
        # record's "published" mark leaves a delivery that the next daemon replays (a crashed
        # decision may itself be such a replay). A job still pending was published at least
        # once; a newer request of its scope may have superseded it before any delivery of it
        # was published (a job that can never start is not published again).
        job = facts["job_id"]
        per_life = [life.count(job) for life in published_by_life]
        state = evidence.jobs[job]["state"]
        assert max(per_life) <= 1, (facts, state, per_life)
        if state == "pending":
            assert sum(per_life) >= 1, (facts, state, per_life)
        assert state in {"pending", "cancelled"}
        # Every answer is the decision's reply (an earlier life may have answered a replay too).
        answers = replies[facts["request_id"]]
        assert answers == [facts["reply"]] * (len(answers) if facts["replayed"] else 1)
    acc = account("2 crash after decision", ids, replies, evidence, left, crashes=len(crashed))
    acc.report()
    assert acc.lost == 0
    assert acc.duplicated_decisions == 0
    assert acc.decisions == acc.sent == acc.replied == acc.acked
    assert not unequal_replies(replies)


@pytest.mark.parametrize("retry", ["after-restart", "held-by-the-killed-daemon"])
async def test_crash_then_a_publishers_retry_still_one_job_message(  # noqa: PLR0917 - fixtures arrive as parameters
    spawn: DaemonFactory,
    amqp_url: str,
    shared_redis: aioredis.Redis,
    namespace: str,
    tmp_path: Path,
    retry: str,
) -> None:
    """SIGKILL between the decision and the publish; the publisher also re-publishes the request
    (same message_id and body) either once the daemon is gone or while it still holds the first."""
    body = orjson.dumps(manage_request("once", JOB_TYPE, "solo").body)
    report = tmp_path / "crash.json"
    async with Publisher(amqp_url, "crash-retry") as pub:
        await pub.publish_raw("manage", body, correlation_id="first", message_id="once")
        if retry == "held-by-the-killed-daemon":
            await pub.publish_raw("manage", body, correlation_id="retry", message_id="once")
        crashing = spawn(
            "crashing",
            amqp_url,
            module="tests.faults.launcher",
            JLM_TEST_FAULT="crash_after_decision:1",
            JLM_TEST_FAULT_REPORT=str(report),
        ).start()
        assert await crashing.wait_exit(60) == 137, crashing.tail()
        facts = orjson.loads(report.read_bytes())
        assert facts["enqueued"]
        assert (await request_records(shared_redis, namespace))["once"]["job"] == facts["job_id"]
        if retry == "after-restart":
            await pub.publish_raw("manage", body, correlation_id="retry", message_id="once")
        survivor = spawn("survivor", amqp_url).start()
        await survivor.wait_ready()
        assert not await pub.wait_replies({"first", "retry"}, 60)
        replies = dict(pub.replies)
        assert await survivor.terminate() == 0
    jobs = [m.message_id for m in await drain(amqp_url, f"jlm.jobs.{JOB_TYPE}")]
    events = [e for e in await stream_events(amqp_url) if e["request_id"] == "once"]
    print(
        f"crash + retry {retry}: replies {sum(len(r) for r in replies.values())}, "
        f"job messages {len(jobs)}, decision events {len(events)}"
    )
    assert replies["first"] == replies["retry"] == [facts["reply"]]
    assert jobs == [facts["job_id"]]
    assert [e["type"] for e in events] == ["job.enqueued"]
    assert await queue_count(amqp_url, "jlm.requests") == 0
