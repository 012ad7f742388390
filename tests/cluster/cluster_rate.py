"""Decisions/s and broker CPU per request of one daemon on a private 3-node RabbitMQ cluster.

    .venv/bin/python -m tests.cluster.cluster_rate [--requests 6000] [--runs 2]

The cluster is the one of the fail-over test (rabbit_cluster.py), with the mirror policy of
docs/scaling.md; the daemon uses a quorum `jlm.requests` and lists the three nodes; the requests
and replies go through node 1, where the daemon connects and where the queue's and the stream's
leaders are. Redis is the machine's (its own namespace, removed at the end). Prints, per run, the
rate between 10 % and 90 % of the replies and the CPU milliseconds per request of each node and
of the daemon. Not a test: a measurement quoted in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

import psutil
from bench.amqp import JOB_QUEUE, REPLIES, Amqp, declare, now_iso, properties, request_body
from bench.env import delete_namespace
from bench.procs import free_port, start_daemon
from tests.cluster.rabbit_cluster import MIRROR_POLICY, RabbitCluster

from jlm.amqp.names import REQUESTS
from jlm.config import load_settings

REDIS_URL = "redis://127.0.0.1:6379/0"


async def one_run(cluster: RabbitCluster, env: dict[str, str], n: int) -> str:
    beams = [psutil.Process(node.beam_pid()) for node in cluster.nodes]
    async with Amqp(cluster.nodes[0].url()) as amqp:
        await amqp.purge(REQUESTS, REPLIES)
        at, run = now_iso(), uuid.uuid4().hex[:6]
        await amqp.preload(
            (request_body(i % 1000, i, at), properties(f"{run}{i}", f"{run}{i}", True))
            for i in range(n)
        )
        proc = start_daemon(env | {"JLM_METRICS_ADDR": f"127.0.0.1:{free_port()}"})
        marks: list[tuple[float, int, list[float]]] = []
        try:
            for level in (0.1, 0.9):
                while (count := await amqp.count(REPLIES)) < level * n:
                    if not proc.alive():
                        raise RuntimeError("the daemon exited")
                    await asyncio.sleep(0.05)
                cpu = [sum(b.cpu_times()[:2]) for b in beams] + [proc.cpu_seconds()]
                marks.append((time.monotonic(), count, cpu))
        finally:
            await proc.stop()
        await amqp.purge(REPLIES, JOB_QUEUE)
    (t0, n0, c0), (t1, n1, c1) = marks
    done = n1 - n0
    ms = [1000 * (b - a) / done for a, b in zip(c0, c1, strict=True)]
    nodes = " / ".join(f"{m:.2f}" for m in ms[:-1])
    return (
        f"{done / (t1 - t0):.0f} requests/s; CPU ms per request: nodes {nodes} "
        f"(sum {sum(ms[:-1]):.2f}), daemon {ms[-1]:.2f}"
    )


async def main(requests: int, runs: int) -> None:
    cluster = RabbitCluster(Path(tempfile.mkdtemp(prefix="jlm-cluster-rate-")))
    namespace = f"jlmr{uuid.uuid4().hex[:8]}"
    try:
        print(f"cluster formed in {cluster.start():.1f}s", flush=True)
        cluster.nodes[0].ctl("set_policy", "--apply-to", "queues", *MIRROR_POLICY)
        env = {
            "JLM_AMQP_URL": ",".join(cluster.urls()),
            "JLM_REDIS_URL": REDIS_URL,
            "JLM_REDIS_NAMESPACE": namespace,
            "JLM_REQUESTS_QUEUE_TYPE": "quorum",
            "JLM_LOG_LEVEL": "WARNING",
        }
        first = {"JLM_AMQP_URL": cluster.nodes[0].url(), "JLM_METRICS_ADDR": "127.0.0.1:0"}
        await declare(load_settings(env | first))
        for k in range(1, runs + 1):
            print(f"run {k}: {await one_run(cluster, env, requests)}", flush=True)
    finally:
        cluster.stop()
        await delete_namespace(REDIS_URL, namespace)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=6000)
    p.add_argument("--runs", type=int, default=2)
    a = p.parse_args()
    asyncio.run(main(a.requests, a.runs))
