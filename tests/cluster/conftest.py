"""Fixtures of the cluster tests: a private 3-node RabbitMQ cluster, the accounting summary."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.cluster.rabbit_cluster import RabbitCluster
from tests.cluster.summary import LINES
from tests.support.rabbit_node import available


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if LINES:
        terminalreporter.section("cluster accounting")
        for line in LINES:
            terminalreporter.write_line(line)


@pytest.fixture
def rabbit_cluster(tmp_path: Path) -> Iterator[RabbitCluster]:
    """Three RabbitMQ nodes of this test on loopback, joined; every node stopped at the end."""
    if not available():
        pytest.fail("rabbitmq-server is not installed: `make services` installs it (Debian)")
    cluster = RabbitCluster(tmp_path / "rabbit", size=3)
    try:
        seconds = cluster.start()
        line = f"[rabbit cluster] 3 nodes formed in {seconds:.1f}s " + " ".join(
            f"{k}={v:.1f}s" for k, v in cluster.timings.items()
        )
        LINES.append(line)
        print("\n" + line, flush=True)
        yield cluster
    finally:
        cluster.stop()
