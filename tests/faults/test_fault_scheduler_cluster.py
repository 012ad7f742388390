"""Scheduled jobs on a 3-master Redis Cluster: the debounce and delay tests of
tests/test_debounce.py run again with JLM_REDIS_CLUSTER=true (this module's `make_settings` and
`redis_client` point them at the cluster): every script stays in one slot. Then the due sets of
many scheduled jobs are found spread over every master."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio.cluster import RedisCluster
from tests.support.services import RunningDaemon

# The scheduling tests, collected again in this module under its cluster fixtures.
from tests.test_debounce import (  # noqa: F401 - collected again here
    test_a_burst_becomes_one_job_published_after_the_quiet_time,
    test_a_replayed_debounce_request_changes_nothing,
    test_cancel_of_a_scheduled_job_means_it_is_never_published,
    test_events_say_scheduled_then_enqueued,
    test_max_wait_caps_a_burst_that_never_ends,
    test_not_before_holds_the_job_and_status_shows_when_it_is_due,
    test_replace_supersedes_a_scheduled_job_and_skip_answers_with_it,
    test_the_job_type_sets_debounce_by_default,
)

from jlm.client import Client
from jlm.config import Settings
from jlm.keys import DUE_SLOTS, Keys

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def make_settings(cluster_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    return cluster_settings


@pytest.fixture
def redis_client(cluster_redis: RedisCluster) -> RedisCluster:
    return cluster_redis


async def test_due_sets_spread_over_every_master(
    daemon: RunningDaemon, client: Client, settings: Settings, cluster_redis: RedisCluster
) -> None:
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    for i in range(200):
        reply = await client.call(
            "manage",
            {"job_type": "spread", "cache_prefix": f"s{i}", "payload": {}, "not_before": later},
        )
        assert reply["state"] == "scheduled"
    keys = Keys(settings.redis_namespace)
    nodes: dict[str, int] = {}
    total = 0
    for slot in range(DUE_SLOTS):
        name = keys.due(slot)
        n = await cluster_redis.zcard(name)
        total += n
        node = cluster_redis.get_node_from_key(name)
        nodes[node.name] = nodes.get(node.name, 0) + n
    assert total == 200
    assert len(nodes) == 3, nodes
    assert all(nodes.values()), nodes
