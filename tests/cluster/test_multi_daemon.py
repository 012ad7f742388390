"""Several daemons on one request queue: the per-scope order across instances is `requested_at`.

Three `jlm run` processes consume the same `jlm.requests` (the machine's broker, a fresh vhost;
the machine's Redis, a fresh namespace). The requests of 20 scopes are published in increasing
`requested_at` order, but each instance takes its own prefetch window of the queue, so the
requests of one scope are decided by different instances in an order that is not theirs. The
contract's rule: a request older than its scope's current job never supersedes it; it is answered
`deduplicated` with the current job and enqueues nothing. So at the end each scope's live job is
the job of its newest request, every job was superseded only by a newer one, and each request has
exactly one decision.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from tests.cluster.publisher import FailoverPublisher, wait_answers
from tests.cluster.scopes import (
    check_one_live_job_of_the_newest,
    check_stale_answers,
    check_supersede_chains,
    manage_requests,
)
from tests.cluster.summary import LINES
from tests.support.daemon import DaemonProcess, daemon_env, exits, metric
from tests.support.ledger import account, collect, queue_count, unequal_replies
from tests.support.services import AMQP_BASE, REDIS_URL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REQUESTS = int(2000 * float(os.environ.get("JLM_CLUSTER_SCALE", "1")))
SCOPES = 20
INSTANCES = 3
JOB_TYPE = "order-load"


async def test_requested_at_orders_a_scope_across_instances(
    vhost: str, redis_client: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    url = f"{AMQP_BASE}/{vhost}"
    daemons = [
        DaemonProcess(f"d{i}", daemon_env(url, REDIS_URL, namespace, JLM_PREFETCH="64"), tmp_path)
        for i in range(INSTANCES)
    ]
    requests = manage_requests(REQUESTS, SCOPES, JOB_TYPE, "o", step_us=1)
    ids = {r.message_id for r in requests}
    publishers = [FailoverPublisher([url], "p0"), FailoverPublisher([url], "p1")]
    decided: dict[str, int] = {}
    try:
        for d in daemons:
            d.start()
        for d in daemons:
            await d.wait_ready(60)
        for p in publishers:
            await p.connect()
        started = time.monotonic()
        # Two publishers, each with half of the scopes, each in requested_at order.
        for k, p in enumerate(publishers):
            await p.send([r for r in requests if int(r.scope[1:]) % 2 == k])
        missing = await wait_answers(publishers, requests, 180)
        elapsed = time.monotonic() - started
        assert not missing, f"{len(missing)} requests never answered, e.g. {sorted(missing)[:5]}"
        for d in daemons:
            decided[d.name] = int(metric(await d.metrics(), "jlm_requests_total", op="manage"))
        codes = [await d.terminate() for d in daemons]
    finally:
        replies: dict[str, list[dict]] = {}
        for p in publishers:
            replies.update(p.replies)
            await p.close()
        for d in daemons:
            d.kill()
    assert codes == [0] * INSTANCES, exits(daemons, codes)

    left = await queue_count(url, "jlm.requests")
    evidence = await collect(url, redis_client, namespace, [f"jlm.jobs.{JOB_TYPE}"])
    stale = check_stale_answers(evidence.records, evidence.jobs, replies, requests)
    superseded = check_supersede_chains(evidence.jobs)
    acc = account(
        f"{INSTANCES} daemons, {SCOPES} scopes, requested_at order",
        ids,
        replies,
        evidence,
        left,
        stale=stale,
        superseded=superseded,
        per_instance="/".join(str(decided[d.name]) for d in daemons),
        seconds=round(elapsed, 1),
    )
    LINES.append(acc.line())
    print("\n" + acc.line(), flush=True)
    assert acc.lost == 0
    assert acc.duplicated_decisions == 0
    assert acc.decisions == acc.sent == acc.replied == acc.acked == REQUESTS
    assert not unequal_replies(replies)
    check_one_live_job_of_the_newest(requests, evidence.jobs, replies)
    # Every instance took part, and the instances did decide requests out of their order.
    assert all(n > 0 for n in decided.values()), decided
    assert stale > 0, "no request was decided after a newer one: the test shows nothing"
    # Each stale request enqueued nothing; every other one enqueued exactly one job.
    assert len(evidence.jobs) == REQUESTS - stale
