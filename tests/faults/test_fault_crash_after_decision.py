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
from tests.faults.ledger import (
    account,
    collect,
    drain,
    queue_count,
    request_records,
    unequal_replies,
)
from tests.faults.load import Publisher, manage_request

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
    published_early: list[str] = []
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
            published_early += early
            assert facts["job_id"] not in early
            assert facts["request_id"] not in pub.replies
        survivor = spawn("survivor", amqp_url).start()
        await survivor.wait_ready()
        missing = await pub.wait_replies(ids, 60)
        assert not missing
        replies = dict(pub.replies)
    assert await survivor.terminate() == 0
    left = await queue_count(amqp_url, "jlm.requests")
    evidence = await collect(amqp_url, shared_redis, namespace, [f"jlm.jobs.{JOB_TYPE}"])
    evidence.job_messages += published_early
    for facts in crashed:
        assert facts["enqueued"]
        # The redelivered request published the very job that had been decided, once.
        assert evidence.job_messages.count(facts["job_id"]) == 1
        assert replies[facts["request_id"]] == [facts["reply"]]
    acc = account("2 crash after decision", ids, replies, evidence, left, crashes=len(crashed))
    acc.report()
    assert acc.lost == 0
    assert acc.duplicated_decisions == 0
    assert acc.decisions == acc.sent == acc.replied == acc.acked
    assert not unequal_replies(replies)
