"""Three daemons on one request queue, `replace` requests without `requested_at`: none is stale.

A request without `requested_at` is stamped inside its Redis decision (the server's `TIME`), so
it is ordered by its decision and never loses to a request that some daemon happened to decide
later. To make the race certain rather than likely, each daemon waits a random time (a fixed
seed) between reading a request and deciding it: requests of one scope, spread over three
daemons, reach Redis in an order that is not their delivery order. A stamp taken by a daemon
before that wait (a delivery clock) would make some of them "older" than the scope's job.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from tests.faults.conftest import DaemonFactory
from tests.faults.load import Publisher, manage_request
from tests.support.daemon import metric
from tests.support.ledger import drain, job_hashes, queue_count

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

INSTANCES = 3
REQUESTS = 3000
SCOPES = 20
RUNS = 1
DELAY_MS = 4


async def test_three_daemons_never_drop_a_replace_without_requested_at(
    spawn: DaemonFactory,
    amqp_url: str,
    shared_redis: aioredis.Redis,
    namespace: str,
    tmp_path: Path,
) -> None:
    # Every job decided is counted below: a scope keeps all of its ended ones here.
    config = tmp_path / "jlm.toml"
    config.write_text(f"max_history_jobs = {REQUESTS}\n")
    daemons = [
        spawn(
            f"d{i}",
            amqp_url,
            module="tests.faults.launcher",
            JLM_TEST_FAULT=f"delay_decision:{DELAY_MS}:{1000 + i}",
            JLM_PREFETCH="100",
            JLM_CONFIG=str(config),
        ).start()
        for i in range(INSTANCES)
    ]
    for d in daemons:
        await d.wait_ready()
    results = []
    async with Publisher(amqp_url, "order", window=500) as pub:
        for run in range(RUNS):
            job_type = f"order-{run}"
            requests = [
                manage_request(f"r{run}-{i:05d}", job_type, f"s{i % SCOPES:02d}")
                for i in range(REQUESTS)
            ]
            started = time.monotonic()
            await pub.send_all(requests)
            missing = await pub.wait_replies({r.message_id for r in requests}, 120)
            seconds = time.monotonic() - started
            assert not missing, f"run {run}: {len(missing)} requests never answered"
            replies = [pub.replies[r.message_id] for r in requests]
            assert all(len(r) == 1 and r[0]["success"] for r in replies), run
            deduplicated = sum(1 for r in replies if r[0]["deduplicated"])
            messages = [m.message_id for m in await drain(amqp_url, f"jlm.jobs.{job_type}")]
            jobs = {
                job_id: fields
                for job_id, fields in (await job_hashes(shared_redis, namespace)).items()
                if fields["job_type"] == job_type
            }
            live = Counter(f["cache_prefix"] for f in jobs.values() if f["state"] == "pending")
            results.append(
                f"run {run}: {len(messages)} job messages, {deduplicated} deduplicated replies, "
                f"{len(live)} scopes with {set(live.values())} live job(s), {seconds:.1f}s"
            )
            print(results[-1], flush=True)
            assert deduplicated == 0, run
            assert len(messages) == len(set(messages)) == REQUESTS, run
            assert set(messages) == {r[0]["new_job_id"] for r in replies}
            assert len(jobs) == REQUESTS
            assert live == dict.fromkeys(live, 1), run
            assert len(live) == SCOPES
    decided = [int(metric(await d.metrics(), "jlm_requests_total", op="manage")) for d in daemons]
    print(f"decided per daemon: {decided}")
    # Every daemon took part: the requests of each scope were spread over all three.
    assert all(n > 0 for n in decided), decided
    assert sum(decided) == REQUESTS * RUNS
    for d in daemons:
        assert await d.terminate() == 0
    assert await queue_count(amqp_url, "jlm.requests") == 0
