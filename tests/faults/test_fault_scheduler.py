"""Scheduled jobs across daemon deaths: three daemons, one SIGKILLed while jobs are due; a daemon
killed right after its scheduler made a due job pending (the fault launcher), holding a sweep's
entries; a dead taker's lease, played with the scripts; every daemon stopped while a job waits for
its `not_before`.

Invariants: every scheduled job is published (none lost), never before its due time, and once;
a second message of one job is allowed only for the jobs the killed daemon had taken (its lease
expired, and it may have published them before it died: a worker claims a job once).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from tests.faults.conftest import DaemonFactory
from tests.scheduled_helpers import JobWatcher
from tests.support.services import REDIS_URL

from jlm.client import Client
from jlm.due import DueSets
from jlm.keys import DUE_SLOTS, Keys, due_slot
from jlm.metrics import Metrics
from jlm.scheduler import BATCH, LEASE_MS
from jlm.store import Store, connect

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# The issue asks for 10,000 scheduled jobs over 1,000 scopes. JLM_FAULTS_SCALE scales the rounds
# (e.g. 0.3 on a loaded machine); every round schedules one job in each scope.
SCOPES = 1000
ROUNDS = max(2, int(10 * float(os.environ.get("JLM_FAULTS_SCALE", "1"))))
KILL_ROUND = ROUNDS // 2
SPREAD = 2.0  # seconds over which one round's jobs fall due
LEAD = 12.0  # seconds from a round's first request to its first due time: a loaded machine
# answers 1,000 requests in 4 to 9 s
JOB_TYPE = "sched-crash"


async def schedule_round(client: Client, r: int) -> list[dict[str, Any]]:
    """One job per scope, due over SPREAD seconds from LEAD s on (each replaces the
    scope's previous job, already published)."""
    start = datetime.now(UTC) + timedelta(seconds=LEAD)
    waiting = []
    for s in range(SCOPES):
        due = start + timedelta(seconds=SPREAD * s / SCOPES)
        body = {
            "job_type": JOB_TYPE,
            "cache_prefix": f"s{s}",
            "payload": {"round": r, "scope": s},
            "not_before": due.isoformat(),
        }
        fut = await client.send("manage", body)
        assert fut is not None
        waiting.append(fut)
    return list(await asyncio.wait_for(asyncio.gather(*waiting), 120))


async def held_by_the_dead(namespace: str) -> int:
    """Entries still taken a second after a kill: the live daemons settle theirs within ms, so
    these are the killed daemon's, left to their lease."""
    await asyncio.sleep(1.0)
    redis = aioredis.Redis.from_url(REDIS_URL)
    keys = Keys(namespace)
    try:
        return sum([await redis.zcard(keys.due_taken(slot)) for slot in range(DUE_SLOTS)])
    finally:
        await redis.aclose()


async def test_three_schedulers_one_killed_while_jobs_are_due(
    spawn: DaemonFactory, amqp_url: str, client: Client, namespace: str
) -> None:
    daemons = [spawn(f"d{i}", amqp_url) for i in range(3)]
    for d in daemons:
        d.start()
    for d in daemons:
        await d.wait_ready(60)
    due: dict[str, float] = {}
    async with JobWatcher(amqp_url, f"jlm.jobs.{JOB_TYPE}") as jobs:
        for r in range(ROUNDS):
            sent = time.time()
            replies = await schedule_round(client, r)
            print(f"round {r}: {SCOPES} requests answered in {time.time() - sent:.2f} s")
            states = Counter(x.get("state") for x in replies)
            assert states == {"scheduled": SCOPES}, states
            for x in replies:
                due[x["new_job_id"]] = datetime.fromisoformat(x["due_at"]).timestamp()
            if r == KILL_ROUND:
                # Killed while this round's jobs fall due: in the middle of the spread.
                await asyncio.sleep(max(0.0, min(due.values()) - time.time()) + SPREAD / 2)
                daemons[0].kill()
                held = await held_by_the_dead(namespace)
            deadline = time.time() + 60
            while not set(due) <= set(jobs.ids()) and time.time() < deadline:
                await asyncio.sleep(0.2)
        await asyncio.sleep(12)  # a lease (10 s) and more: any second message has come
    counts = Counter(jobs.ids())
    lost = set(due) - set(counts)
    early = [a for a in jobs.arrivals if a.at < due[a.body["job_id"]]]
    twice = [j for j, n in counts.items() if n > 1]
    lateness = sorted(
        a.at - due[a.body["job_id"]] for a in jobs.arrivals if counts[a.body["job_id"]] == 1
    )
    print(
        f"\n{len(due)} scheduled jobs over {SCOPES} scopes in {ROUNDS} rounds, 3 daemons, one "
        f"killed in round {KILL_ROUND}: {len(jobs.arrivals)} job messages, {len(lost)} lost, "
        f"{len(early)} early, {len(twice)} published twice; lateness p50 "
        f"{lateness[len(lateness) // 2]:.3f} s, p99 {lateness[int(len(lateness) * 0.99)]:.3f} s, "
        f"max {lateness[-1]:.3f} s; the killed daemon held {held} taken entries"
    )
    assert set(counts) == set(due), "only scheduled jobs are published"
    assert not lost
    assert not early
    assert max(counts.values()) <= 2
    assert len(twice) <= BATCH, "a second message only for what the killed daemon had taken"


async def test_not_before_survives_a_restart_of_every_daemon(
    spawn: DaemonFactory, amqp_url: str, client: Client
) -> None:
    daemons = [spawn(f"d{i}", amqp_url) for i in range(2)]
    for d in daemons:
        d.start()
    for d in daemons:
        await d.wait_ready(60)
    not_before = datetime.now(UTC) + timedelta(seconds=4)
    async with JobWatcher(amqp_url, f"jlm.jobs.{JOB_TYPE}") as jobs:
        reply = await client.call(
            "manage", {"job_type": JOB_TYPE, "payload": {}, "not_before": not_before.isoformat()}
        )
        assert reply["state"] == "scheduled"
        for d in daemons:
            assert await d.terminate() == 0
        await asyncio.sleep(max(0.0, not_before.timestamp() - time.time()) + 1)
        assert jobs.arrivals == [], "no daemon runs: nothing is published"
        restarted = time.time()
        daemons[1].start()
        await daemons[1].wait_ready(60)
        await asyncio.sleep(3)
    assert jobs.ids() == [reply["new_job_id"]]
    assert jobs.arrivals[0].at >= restarted
    status = await client.call("status", {"job_id": reply["new_job_id"]})
    assert status["state"] == "pending"


async def test_a_daemon_dead_after_its_take_loses_nothing(
    spawn: DaemonFactory, amqp_url: str, client: Client, namespace: str
) -> None:
    """Two due entries taken by a daemon that then died: one right after the take, one after
    its job was made pending. Another daemon publishes both once their lease has expired."""
    daemon = spawn("d0", amqp_url).start()
    await daemon.wait_ready(60)
    not_before = datetime.now(UTC) + timedelta(seconds=1)
    ids = []
    for i in range(2):
        reply = await client.call(
            "manage",
            {
                "job_type": JOB_TYPE,
                "cache_prefix": f"t{i}",
                "payload": {"i": i},
                "not_before": not_before.isoformat(),
            },
        )
        ids.append(reply["new_job_id"])
    assert await daemon.terminate() == 0
    await asyncio.sleep(max(0.0, not_before.timestamp() - time.time()) + 0.2)
    # The dead daemon's part, played here with the daemon's own scripts.
    store = Store(connect(REDIS_URL), Keys(namespace), Metrics(process=False))
    due = DueSets(store, 3600)
    taken_at = time.time()
    # Both ids may share a due set (1 in 16): each set is taken once, and holds its own ids.
    taken = []
    for slot in sorted({due_slot(job_id) for job_id in ids}):
        taken += await due.take(slot, BATCH, LEASE_MS)
    assert sorted(taken) == sorted(ids)
    promoted = await due.promote(ids[1], LEASE_MS)
    assert promoted.verdict == "publish"
    await store.close()
    async with JobWatcher(amqp_url, f"jlm.jobs.{JOB_TYPE}") as jobs:
        daemon.start()
        await daemon.wait_ready(60)
        deadline = time.time() + 30
        while len(jobs.arrivals) < 2 and time.time() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)
    assert sorted(jobs.ids()) == sorted(ids)
    waited = [a.at - taken_at for a in jobs.arrivals]
    print(f"\npublished {', '.join(f'{w:.2f}' for w in waited)} s after the dead daemon's take")
    assert all(w >= LEASE_MS / 1000 for w in waited), "not while the dead daemon's lease ran"
    for job_id in ids:
        status = await client.call("status", {"job_id": job_id})
        assert status["state"] == "pending"


async def test_a_scheduler_killed_between_promote_and_publish_loses_nothing(
    spawn: DaemonFactory, amqp_url: str, client: Client, namespace: str
) -> None:
    """The only daemon dies right after the scheduler made its 20th due job pending, holding a
    sweep's entries (promoted or not, published or not); two daemons started after it publish
    every job, none before its time, at most twice."""
    crasher = spawn(
        "crasher", amqp_url, module="tests.faults.launcher", JLM_TEST_FAULT="crash_after_promote:20"
    ).start()
    await crasher.wait_ready(60)
    start = datetime.now(UTC) + timedelta(seconds=3)
    due: dict[str, float] = {}
    async with JobWatcher(amqp_url, f"jlm.jobs.{JOB_TYPE}") as jobs:
        for i in range(300):
            at = start + timedelta(milliseconds=i)
            reply = await client.call(
                "manage",
                {
                    "job_type": JOB_TYPE,
                    "cache_prefix": f"k{i}",
                    "payload": {"i": i},
                    "not_before": at.isoformat(),
                },
            )
            assert reply["state"] == "scheduled"
            due[reply["new_job_id"]] = at.timestamp()
        assert await crasher.wait_exit(30) == 137, crasher.tail()
        held = await held_by_the_dead(namespace)
        by_crasher = len(jobs.arrivals)
        survivors = [spawn(f"d{i}", amqp_url).start() for i in range(2)]
        for d in survivors:
            await d.wait_ready(60)
        deadline = time.time() + 40
        while not set(due) <= set(jobs.ids()) and time.time() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)
    counts = Counter(jobs.ids())
    early = [a for a in jobs.arrivals if a.at < due[a.body["job_id"]]]
    twice = [j for j, n in counts.items() if n > 1]
    print(
        f"\nthe crasher held {held} taken entries and had published {by_crasher} job messages; "
        f"after it: {len(jobs.arrivals)} in all, {len(set(due) - set(counts))} lost, "
        f"{len(early)} early, {len(twice)} published twice"
    )
    assert held > 0, "the crash left entries taken (the case under test)"
    assert set(counts) == set(due)
    assert not early
    assert max(counts.values()) <= 2
    assert len(twice) <= by_crasher, "a second message only for a job the crasher published"
