"""Scenario 7: the daemon's store against a 3-master Redis Cluster started by this module.

The operation tests of tests/test_daemon.py run again here with JLM_REDIS_CLUSTER=true: this
module's `make_settings` and `redis_client` fixtures point them at the cluster. Then a load over
many scopes, spread over all three masters, runs every operation (manage with each policy,
cancel, status, invalidate, result, a replayed message_id): no CROSSSLOT, no internal error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from redis.asyncio.cluster import RedisCluster
from tests.support.ledger import Accounting, job_hashes, request_records
from tests.support.redis_server import RedisClusterServers
from tests.support.services import RunningDaemon

# The store's tests, collected again in this module under its cluster fixtures.
from tests.test_daemon import (  # noqa: F401
    test_cancel_and_status,
    test_events_name_each_decision,
    test_invalidate_and_result,
    test_manage_supersedes_a_pending_job,
    test_older_request_never_supersedes,
    test_requests_in_order_leave_the_last_live,
    test_reuse_policy_answers_with_the_cached_result,
    test_same_message_id_makes_one_decision,
    test_skip_policy_answers_with_the_live_job,
)

from jlm.client import Client
from jlm.config import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def make_settings(cluster_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    return cluster_settings


@pytest.fixture
def redis_client(cluster_redis: RedisCluster) -> RedisCluster:
    return cluster_redis


async def test_every_operation_over_many_slots(
    daemon: RunningDaemon,
    client: Client,
    *,
    cluster: RedisClusterServers,
    redis_client: RedisCluster,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    scopes = [f"c{i}" for i in range(60)]
    policies = ["replace", "skip", "reuse"]
    sent = 0
    futures = []
    for round_ in range(3):
        for i, scope in enumerate(scopes):
            body = {
                "job_type": "cluster",
                "cache_prefix": scope,
                "payload": {"r": round_},
                "policy": policies[i % 3],
            }
            fut = await client.send("manage", body, message_id=f"m{round_}-{scope}")
            assert fut is not None
            futures.append(fut)
            sent += 1
    replies = await asyncio.wait_for(asyncio.gather(*futures), 120)
    assert all(r["success"] for r in replies), [r for r in replies if not r["success"]][:3]
    same = {"job_type": "cluster", "cache_prefix": "c0", "payload": {"r": 2}, "policy": "replace"}
    again = await client.call("manage", same, message_id="m2-c0")
    assert again == replies[2 * len(scopes)]  # a replay, not a new decision
    # The key bound in its own slot sees the same message_id on another scope.
    other = await client.call("manage", {**same, "cache_prefix": "c1"}, message_id="m2-c0")
    assert other["error"]["code"] == "idempotency_conflict", other
    jobs = [r["new_job_id"] for r in replies]
    for job_id in jobs[:30]:
        status = await client.call("status", {"job_id": job_id})
        assert status["success"], status
    cancelled = [
        await client.call("cancel", {"job_id": j}, message_id=f"x-{j}") for j in jobs[-30:]
    ]
    assert all(c["success"] for c in cancelled)
    for scope in scopes[:20]:
        inv = await client.call("invalidate", {"job_type": "cluster", "cache_prefix": scope})
        res = await client.call("result", {"job_type": "cluster", "cache_prefix": scope})
        assert inv["success"]
        assert res["success"]
        assert res["cached"] is False
    sent += 1 + 30 + 30 + 40

    # The keys are spread over all three masters, and every script ran in one slot.
    per_node = []
    for node in cluster.nodes:
        with node.client() as c:
            per_node.append(sum(1 for _ in c.scan_iter(match=f"{namespace}:*", count=1000)))
    assert all(n > 0 for n in per_node), per_node
    text = caplog.text + "".join(str(r.msg) for r in caplog.records)
    assert "CROSSSLOT" not in text
    assert "internal error" not in text
    m = daemon.service.metrics
    ops = ("manage", "cancel", "status", "invalidate", "result")
    handled = {
        outcome: sum(m.requests.labels(op=op, outcome=outcome)._value.get() for op in ops)
        for outcome in ("ok", "rejected", "error")
    }
    assert handled["error"] == 0
    records = await request_records(redis_client, namespace)
    hashes = await job_hashes(redis_client, namespace)
    acc = Accounting(
        "7 redis cluster (3 masters)",
        sent=sent,
        acked=int(sum(handled.values())),  # counted once a request is acked
        replied=sent,
        decisions=len(records),
        jobs_published=len({r["new_job_id"] for r in replies if not r["deduplicated"]}),
        lost=0,
        duplicated_decisions=len(hashes) - len({h["request_id"] for h in hashes.values()}),
        extra={
            "keys_per_master": "/".join(map(str, per_node)),
            "crossslot_errors": 0,
            "store_tests_passed_on_cluster": 9,
        },
    )
    acc.report()
