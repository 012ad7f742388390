"""A RabbitMQ cluster of the test's own on loopback: N nodes (tests/support/rabbit_node.py) sharing
one Erlang cookie, joined to the first.

The machine's broker (rabbit@localhost on 5672) is never touched.
"""

from __future__ import annotations

import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support.rabbit_node import RabbitNode, make_home

# The policy docs/scaling.md asks for: the classic queues (job queues, jlm.dead) mirrored on every
# node (RabbitMQ 3.x); the quorum request queue and the stream replicate by themselves.
MIRROR_POLICY = ("jlm-classic-ha", r"^jlm\.(jobs\..+|dead)$", '{"ha-mode":"all"}')


class RabbitCluster:
    """N nodes joined to the first one; `start()` returns how long the cluster took to form."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.run = uuid.uuid4().hex[:6]
        self.dir = workdir
        self.home = make_home(workdir / "home")
        # The CLI's own distribution ports: a private range, not the machine's 35672-35682.
        ctl_low = random.randrange(40000, 44000, 50)
        self.nodes = [
            RabbitNode(
                workdir,
                f"jlmc{i + 1}-{self.run}",
                home=self.home,
                ctl_ports=(ctl_low, ctl_low + 40),
            )
            for i in range(size)
        ]
        self.timings: dict[str, float] = {}

    def urls(self, vhost: str = "") -> list[str]:
        return [n.url(vhost) for n in self.nodes]

    def start(self) -> float:
        started = time.monotonic()
        for node in self.nodes:
            node.start()
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda n: n.await_startup(), self.nodes))
        self.timings["nodes_up"] = time.monotonic() - started
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", seed.nodename)
            node.ctl("start_app")
        self.wait_members(len(self.nodes))
        self.timings["cluster_formed"] = time.monotonic() - started
        return self.timings["cluster_formed"]

    def running_nodes(self, via: RabbitNode | None = None) -> list[str]:
        node = via or next(n for n in self.nodes if n.running)
        out = node.ctl("eval", "rabbit_nodes:all_running().")
        return sorted(part.strip(" []'\n") for part in out.strip().strip("[]").split(","))

    def wait_members(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.running_nodes()) == n:
                return
            time.sleep(0.5)
        raise AssertionError(f"cluster has {self.running_nodes()} running, expected {n}")

    def stop(self) -> None:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda n: n.stop(), self.nodes))
