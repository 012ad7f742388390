"""Job types a publisher invents: bounded queues and metric series, and refused declarations.

- N distinct unconfigured job types against max_job_types = N/2: at most N/2 get a queue (the rest
  are unknown_job_type), at most N/2 labelled series per metric plus `other`, every request
  answered, and a configured type keeps its label throughout. N is `JLM_FAULTS_JOB_TYPES`
  (default 2,000, the contract's figure). It runs on a RabbitMQ node of its own, with the file
  descriptors its hard limit allows: a thousand priority queues holding persistent messages
  took every descriptor of a shared broker started with the usual 1,024 (`emfile`), which then
  could declare no queue at all.
- A vhost whose queue limit is reached: the requests of a job type whose queue the broker refuses
  are answered `unavailable` and dead-lettered; the other job types go on.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from tests.faults.conftest import DaemonFactory
from tests.faults.load import Publisher
from tests.support.daemon import metric
from tests.support.ledger import Accounting, drain
from tests.support.rabbit_node import RabbitNode

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

TYPES = int(os.environ.get("JLM_FAULTS_JOB_TYPES", "2000"))
MAX = TYPES // 2
CONFIG = f"""
max_job_types = {MAX}
[job_types."cfg.a"]
"""


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def queues(vhost: str, node: RabbitNode | None = None) -> list[str]:
    args = ("list_queues", "-p", vhost, "--quiet", "--no-table-headers", "name")
    out = node.ctl(*args) if node is not None else rabbitmqctl(*args)
    return [line.strip() for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A RabbitMQ node of this module's own, allowed every descriptor the hard limit gives."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the node inherits it
    node = RabbitNode(tmp_path_factory.mktemp("rabbit-types"))
    try:
        node.start()
        node.await_startup()
        yield node
    finally:
        node.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def series(text: str, name: str, label: str) -> set[str]:
    pattern = re.compile(rf'^{name}\{{.*{label}="([^"]*)"', re.MULTILINE)
    return set(pattern.findall(text))


async def test_job_types_beyond_max_job_types_are_refused(
    spawn: DaemonFactory,
    *,
    own_broker: RabbitNode,
    shared_redis: aioredis.Redis,
    namespace: str,
    tmp_path: Path,
) -> None:
    amqp_url, vhost = own_broker.url(), "/"
    config = tmp_path / "jlm.toml"
    config.write_text(CONFIG)
    daemon = spawn("t", amqp_url, JLM_CONFIG=str(config)).start()
    await daemon.wait_ready()
    body = b'{"job_type": "%s", "cache_prefix": "p", "payload": {}}'
    sent: dict[str, str] = {}
    for i in range(TYPES):
        sent[f"u{i}"] = f"t{i:04d}"
        if i % 100 == 0:
            sent[f"c{i}"] = "cfg.a"
    started = time.monotonic()
    async with Publisher(amqp_url, "types", declare=False) as pub:
        for mid, job_type in sent.items():
            await pub.publish_raw(
                "manage", body % job_type.encode(), correlation_id=mid, message_id=mid
            )
        missing = await pub.wait_replies(set(sent), 300)
        replies = dict(pub.replies)
    seconds = round(time.monotonic() - started, 1)
    await asyncio.sleep(11)  # one jlm_queue_messages sample after the last declaration
    text = await daemon.metrics()
    assert await daemon.ready()
    codes = Counter(
        "ok" if replies[m][0]["success"] else replies[m][0]["error"]["code"] for m in replies
    )
    job_queues = [q for q in queues(vhost, own_broker) if q.startswith("jlm.jobs.")]
    admitted = await shared_redis.scard(f"{namespace}:job-types")
    labelled = {
        name: series(text, name, "job_type") - {"other"}
        for name in ("jlm_jobs_enqueued_total", "jlm_jobs_deduplicated_total")
    }
    queue_series = series(text, "jlm_queue_messages", "queue")
    dead = await drain(amqp_url, "jlm.dead")
    assert await daemon.terminate() == 0
    Accounting(
        f"{TYPES} job types, max_job_types {MAX}",
        sent=len(sent),
        replied=len(replies),
        decisions=codes["ok"],
        lost=len(missing),
        extra={
            "answers": dict(codes),
            "job_queues": len(job_queues),
            "admitted_in_redis": admitted,
            "enqueued_series": len(series(text, "jlm_jobs_enqueued_total", "job_type")),
            "queue_messages_series": len(queue_series),
            "dead_lettered": len(dead),
            "seconds": seconds,
        },
    ).report()
    assert not missing
    assert all(len(r) == 1 for r in replies.values())
    assert codes == {"ok": MAX + TYPES // 100, "unknown_job_type": TYPES - MAX}
    assert len(job_queues) == MAX + 1  # and cfg.a's
    assert admitted == MAX
    for name, labels in labelled.items():
        assert len(labels - {"cfg.a"}) <= MAX, name
    assert metric(text, "jlm_jobs_enqueued_total", job_type="cfg.a") == TYPES // 100
    assert len(queue_series - {"jlm.requests", "jlm.jobs.cfg.a", "other"}) <= MAX
    assert "jlm.jobs.cfg.a" in queue_series
    assert len(dead) == TYPES - MAX
    assert {m.headers["x-jlm-error"] for m in dead} == {"unknown_job_type"}


async def test_a_refused_queue_declaration_fails_only_its_job_type(
    spawn: DaemonFactory, amqp_url: str, vhost: str
) -> None:
    daemon = spawn("l", amqp_url).start()
    await daemon.wait_ready()
    body = b'{"job_type": "%s", "cache_prefix": "p", "payload": {}}'
    async with Publisher(amqp_url, "limit", declare=False) as pub:
        await pub.publish_raw("manage", body % b"first", correlation_id="first", message_id="f")
        assert not await pub.wait_replies({"first"}, 30)
        # The request, dead-letter, provenance, reply and first job queues: no room for more.
        limit = f'{{"max-queues": {len(queues(vhost))}}}'
        rabbitmqctl("set_vhost_limits", "-p", vhost, limit)
        refused = [f"r{i}" for i in range(8)]
        for i, mid in enumerate(refused):
            await pub.publish_raw(
                "manage", body % f"new{i}".encode(), correlation_id=mid, message_id=mid
            )
        await pub.publish_raw("manage", body % b"first", correlation_id="again", message_id="a")
        missing = await pub.wait_replies({*refused, "again"}, 60)
        replies = dict(pub.replies)
    assert not missing, daemon.tail()
    assert replies["again"][0]["success"] is True
    for mid in refused:
        assert replies[mid][0]["error"]["code"] == "unavailable"
        assert "new" in replies[mid][0]["error"]["message"]
    dead = await drain(amqp_url, "jlm.dead")
    assert sorted(m.message_id for m in dead) == sorted(refused)
    assert {m.headers["x-jlm-error"] for m in dead} == {"unavailable"}
    assert not [q for q in queues(vhost) if q.startswith("jlm.jobs.new")]
    assert await daemon.ready()
    assert await daemon.terminate() == 0
