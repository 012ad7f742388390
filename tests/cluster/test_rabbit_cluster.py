"""Fail-over: two daemons on a 3-node RabbitMQ cluster lose their node in the middle of a load.

The cluster is the test's own (see rabbit_cluster.py). `jlm.requests` is a quorum queue
(JLM_REQUESTS_QUEUE_TYPE=quorum), `jlm.provenance` a stream; both are replicated on the three
nodes. The job queues and `jlm.dead` are classic queues (the job queues need `x-max-priority`,
which quorum queues of RabbitMQ 3.x do not have), so a policy mirrors them on every node, as
docs/scaling.md tells operators to do. Both daemons list node 1 first; node 1 is SIGKILLed (or its
RabbitMQ application stopped) while the publishers, with confirms, are still sending. Invariants,
read back from Redis and the surviving nodes: every request has exactly one decision and an equal
reply, nothing is lost, each scope has one live job, the job of its newest request.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from tests.cluster.publisher import FailoverPublisher, wait_answers
from tests.cluster.rabbit_cluster import MIRROR_POLICY, RabbitCluster
from tests.cluster.scopes import (
    check_one_live_job_of_the_newest,
    check_stale_answers,
    check_supersede_chains,
    manage_requests,
)
from tests.cluster.summary import LINES
from tests.support.daemon import DaemonProcess, daemon_env
from tests.support.ledger import account, collect, queue_count, unequal_replies
from tests.support.rabbit_node import RabbitNode
from tests.support.services import REDIS_URL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REQUESTS = int(3000 * float(os.environ.get("JLM_CLUSTER_SCALE", "1")))
SCOPES = 100
JOB_TYPE = "cluster-load"


def connections(d: DaemonProcess) -> list[tuple[float, str]]:
    """(time, port) of every broker connection a daemon made, from its JSON log."""
    out = []
    for entry in d.logs():
        msg = entry.get("msg", "")
        if msg.startswith("connected to "):
            at = datetime.fromisoformat(entry["ts"]).timestamp()
            out.append((at, msg.rsplit(":", 1)[1].strip("/")))
    return out


async def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("fault", ["kill-9", "stop_app"])
async def test_daemons_fail_over_when_their_node_dies(  # noqa: C901 one scenario, told in order
    fault: str,
    rabbit_cluster: RabbitCluster,
    redis_client: aioredis.Redis,
    namespace: str,
    tmp_path: Path,
) -> None:
    n1, n2, n3 = rabbit_cluster.nodes
    n2.ctl("set_policy", "--apply-to", "queues", *MIRROR_POLICY)

    def daemon(name: str, order: list[RabbitNode]) -> DaemonProcess:
        env = daemon_env(
            ",".join(n.url() for n in order),
            REDIS_URL,
            namespace,
            JLM_REQUESTS_QUEUE_TYPE="quorum",
            JLM_PREFETCH="64",
            JLM_LOG_LEVEL="INFO",
        )
        return DaemonProcess(name, env, tmp_path)

    daemons = [daemon("d1", [n1, n2, n3]), daemon("d2", [n1, n3, n2])]
    # p1 and p2 publish through nodes that stay up; p3 through node 1, so it loses its
    # connection too and must fail over (republishing its unconfirmed window, same ids).
    publishers = [
        FailoverPublisher([n2.url(), n3.url()], "p1"),
        FailoverPublisher([n3.url(), n2.url()], "p2"),
        FailoverPublisher([n1.url(), n2.url(), n3.url()], "p3"),
    ]
    requests = manage_requests(REQUESTS, SCOPES, JOB_TYPE, "c")
    ids = {r.message_id for r in requests}
    share = [[r for r in requests if int(r.scope[1:]) % 3 == k] for k in range(3)]
    try:
        # d1 declares the topology on node 1: the quorum queue's and the stream's leaders are there.
        daemons[0].start()
        await daemons[0].wait_ready(60)
        daemons[1].start()
        await daemons[1].wait_ready(60)
        for d in daemons:
            assert {int(p) for _, p in connections(d)} == {n1.port}, connections(d)

        def answered() -> int:
            return sum(len(p.answered(ids)) for p in publishers)

        started = time.monotonic()
        killed: dict[str, float] = {}

        async def kill_mid_load() -> None:
            await wait_for(lambda: answered() >= REQUESTS * 0.15, 180, "15 % of the replies")
            killed["wall"] = time.time()
            killed["mono"] = time.monotonic()
            killed["answered"] = answered()
            killed["sent"] = sum(p.published for p in publishers)
            if fault == "kill-9":
                await asyncio.to_thread(n1.kill)
            else:
                await asyncio.to_thread(n1.ctl, "stop_app")

        killer = asyncio.create_task(kill_mid_load())
        for p in publishers:
            await p.connect()
        # Each publisher sends the requests of its third of the scopes in requested_at order,
        # paced so that publishing is still going on when node 1 dies: a request then only
        # arrives after a newer one of its scope when the fail-over redelivers it.
        try:
            async with asyncio.timeout(300):
                await asyncio.gather(
                    *(p.send(share[k], pace=0.1) for k, p in enumerate(publishers))
                )
                await killer
        except TimeoutError:
            state = [(p.name, len(p.confirmed), p.reconnects, dict(p.errors)) for p in publishers]
            raise AssertionError(f"publishing stalled: {state}") from None
        publish_s = time.monotonic() - started
        missing = await wait_answers(publishers, requests, 240)
        load_end = max(p.reply_times[-1] for p in publishers if p.reply_times)
        resent = [0, 0, 0]
        for _ in range(3):
            if not missing:
                break
            # A reply sent to the reply queue of a lost connection is gone: ask again, same ids.
            for k, p in enumerate(publishers):
                again = [r for r in share[k] if r.message_id in missing]
                resent[k] += len(again)
                async with asyncio.timeout(120):
                    await p.resend(again)
            # Longer than the daemon's confirm timeout (30 s): a session whose publishes are never
            # confirmed (after the stream leader's node died) holds its requests that long.
            missing = await wait_answers(publishers, requests, 90, idle=45)
        elapsed = time.monotonic() - started
        assert not missing, f"{len(missing)} requests never answered, e.g. {sorted(missing)[:5]}"
        # Every copy of every request acked before the daemons stop. A request whose publish waits
        # for a confirm that never comes (after the stream leader's node died) is held until the
        # daemon's confirm timeout (30 s), then redelivered and replayed; meanwhile its reply may
        # have come from a copy the publisher sent again.
        drain_started = time.monotonic()
        while await requests_held(n3) and time.monotonic() - drain_started < 90:
            await asyncio.sleep(1)
        drain_s = time.monotonic() - drain_started

        after = {
            d.name: [(t, int(p)) for t, p in connections(d) if t >= killed["wall"]] for d in daemons
        }
        codes = [await d.terminate() for d in daemons]
    finally:
        replies: dict[str, list[dict]] = {}
        for p in publishers:
            replies.update(p.replies)
            await p.close()
        for d in daemons:
            d.kill()
    assert codes == [0, 0], codes

    # The daemons moved to the second node of their own lists.
    assert [port for _, port in after["d1"][:1]] == [n2.port], after
    assert [port for _, port in after["d2"][:1]] == [n3.port], after
    failover_s = max(v[0][0] for v in after.values()) - killed["wall"]

    survivor = n3.url()
    left = await queue_count(survivor, "jlm.requests")
    evidence = await collect(survivor, redis_client, namespace, [f"jlm.jobs.{JOB_TYPE}"])
    acc = account(
        f"rabbit cluster: {fault} of the daemons' node",
        ids,
        replies,
        evidence,
        left,
        stale=sum(1 for f in evidence.records.values() if f.get("why") == "stale"),
        resent="/".join(map(str, resent)),
        publisher_reconnects=sum(p.reconnects for p in publishers),
        publisher_nacks=sum(p.nacked for p in publishers),
        confirm_timeouts="/".join(str(p.confirm_timeouts) for p in publishers),
        p3_nodes="->".join(publishers[2].nodes_used),
        killed_at_answered=killed["answered"],
        killed_at_published=killed["sent"],
        failover_s=round(failover_s, 2),
        reply_stall_s=round(reply_stall(publishers, killed["mono"], load_end), 2),
        publish_s=round(publish_s, 1),
        seconds=round(elapsed, 1),
        drain_s=round(drain_s, 1),
    )
    for p in publishers:
        if p.errors:
            print(f"{p.name} publish errors: {dict(p.errors)}")
    LINES.append(acc.line())
    print("\n" + acc.line(), flush=True)
    assert acc.lost == 0
    assert acc.duplicated_decisions == 0
    assert acc.decisions == acc.sent == acc.replied == acc.acked == REQUESTS
    assert not unequal_replies(replies), "a repeated request got a different reply"
    assert all(rs[0]["success"] for rs in replies.values())
    check_one_live_job_of_the_newest(requests, evidence.jobs, replies)
    check_supersede_chains(evidence.jobs)
    check_stale_answers(evidence.records, evidence.jobs, replies, requests)
    for d in daemons:
        assert "PRECONDITION_FAILED" not in d.log_text()


async def requests_held(node: RabbitNode) -> int:
    """Messages of jlm.requests on the cluster: ready, or delivered and not yet acked."""
    out = await asyncio.to_thread(
        node.ctl, "list_queues", "-q", "--no-table-headers", "name", "messages"
    )
    for line in out.splitlines():
        name, _, count = line.partition("\t")
        if name.strip() == "jlm.requests":
            return int(count)
    return 0


def reply_stall(publishers: list[FailoverPublisher], since: float, until: float) -> float:
    """The longest time without any reply between the kill and the end of the load (before
    unanswered requests are asked again)."""
    times = sorted(t for p in publishers for t in p.reply_times if since <= t <= until)
    points = [since, *times]
    return max((b - a for a, b in itertools.pairwise(points)), default=0.0)
