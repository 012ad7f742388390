"""Health that tells the truth, counters that move by exactly what happened, systemd notify."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.support.daemon import DaemonProcess
from tests.support.redis_server import RedisServer
from tests.support.services import start_daemon
from tests.test_daemon import http_get

from jlm.client import Client
from jlm.config import Settings
from jlm.metrics import Metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """A sample's value as /metrics would show it (0 when the series was never touched)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def wait_status(url: str, want: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            status, _ = await http_get(url)
            if status == want:
                return time.monotonic() - started
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not answer {want} within {timeout}s")


async def test_readyz_follows_redis(
    make_settings: Callable[..., Settings], private_redis: RedisServer
) -> None:
    settings = make_settings(JLM_REDIS_URL=private_redis.url)
    running = await start_daemon(settings)
    try:
        url = running.metrics_url + "/readyz"
        await wait_status(url, 200, 10)
        private_redis.stop()
        down_after = await wait_status(url, 503, 10)
        _, body = await http_get(url)
        assert b"redis down" in body
        private_redis.start()
        up_after = await wait_status(url, 200, 15)
        print(
            f"readyz 503 {down_after:.1f}s after Redis stopped, 200 {up_after:.1f}s after restart"
        )
        async with Client(settings) as client:
            reply = await client.call("manage", {"job_type": "demo", "payload": {}})
            assert reply["success"]
    finally:
        await running.stop()


async def test_requests_wait_while_redis_is_down(
    make_settings: Callable[..., Settings], private_redis: RedisServer
) -> None:
    """A passing fault is not an error: the request stays unacked and completes later."""
    settings = make_settings(JLM_REDIS_URL=private_redis.url)
    running = await start_daemon(settings)
    try:
        async with Client(settings) as client:
            private_redis.stop()
            fut = await client.send(
                "manage", {"job_type": "demo", "payload": {}}, message_id="during-outage"
            )
            assert fut is not None
            await asyncio.sleep(2)
            assert not fut.done(), "answered while Redis was down"
            m = running.service.metrics
            assert sample(m, "jlm_request_retries_total", dependency="redis") > 0
            private_redis.start()
            reply = await asyncio.wait_for(fut, 30)
            assert reply["success"] is True
    finally:
        await running.stop()


async def test_scenario_moves_each_counter_by_exactly_its_amount(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    running = await start_daemon(settings)
    m = running.service.metrics

    try:
        async with Client(settings) as c:
            first = await c.call("manage", {"job_type": "sc", "payload": {}})  # new
            await c.call("manage", {"job_type": "sc", "payload": {}})  # supersede
            await c.call("manage", {"job_type": "sc", "payload": {}, "policy": "skip"})  # skip
            other = await c.call("manage", {"job_type": "sc", "cache_prefix": "b", "payload": {}})
            await c.call("cancel", {"job_id": other["new_job_id"]})  # cancel
            await c.call("cancel", {"job_id": first["new_job_id"]})  # already cancelled: no-op
            await c.call("manage", b"{bad")  # reject
            await c.call("invalidate", {"job_type": "sc"})  # nothing cached
        assert sample(m, "jlm_requests_total", op="manage", outcome="ok") == 4
        assert sample(m, "jlm_requests_total", op="manage", outcome="rejected") == 1
        assert sample(m, "jlm_requests_total", op="cancel", outcome="ok") == 2
        assert sample(m, "jlm_requests_total", op="invalidate", outcome="ok") == 1
        assert sample(m, "jlm_jobs_enqueued_total", job_type="sc", priority="5") == 3
        assert sample(m, "jlm_jobs_superseded_total", job_type="sc") == 1
        assert sample(m, "jlm_jobs_deduplicated_total", job_type="sc", policy="skip") == 1
        assert sample(m, "jlm_jobs_cancelled_total", job_type="sc", reason="superseded") == 1
        assert sample(m, "jlm_jobs_cancelled_total", job_type="sc", reason="requested") == 1
        assert sample(m, "jlm_cache_invalidations_total", job_type="sc") == 1  # the supersede's
        assert sample(m, "jlm_dead_lettered_total", code="invalid_request") == 1
        assert sample(m, "jlm_inflight_requests") == 0
        assert sample(m, "jlm_request_duration_seconds_count", op="manage") == 5
    finally:
        await running.stop()


def test_systemd_notify_ready_watchdog_stopping(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    with DaemonProcess.of(
        settings, tmp_path, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="400000"
    ) as daemon:
        try:
            got: list[str] = []
            while not any("READY=1" in g for g in got):
                got.append(sock.recv(4096).decode())
            daemon.wait_ready_blocking()  # READY=1 came no earlier than consuming
            watchdogs = 0
            while watchdogs < 3:
                msg = sock.recv(4096).decode()
                got.append(msg)
                watchdogs += msg == "WATCHDOG=1"
            assert daemon.terminate_blocking() == 0
            sock.settimeout(1)
            try:
                while True:
                    got.append(sock.recv(4096).decode())
            except TimeoutError:
                pass
        finally:
            daemon.kill()
            sock.close()
    kinds = [g.split("\n")[0].split("=")[0] for g in got]
    ready = kinds.index("READY")
    stopping = kinds.index("STOPPING")
    assert ready < stopping
    assert kinds[ready:stopping].count("WATCHDOG") >= 3
    assert "STATUS=consuming jlm.requests" in got[ready]


async def test_worker_outcomes_move_their_counters_exactly(
    make_settings: Callable[..., Settings],
) -> None:
    from jlm.worker import Job, Worker

    async def handler(job: Job) -> dict[str, bool]:
        if not job.payload["ok"]:
            raise RuntimeError("asked to fail")
        return {"done": True}

    settings = make_settings()
    running = await start_daemon(settings)
    worker = Worker(settings, handler, "wk")
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.started.wait(), 20)
        async with Client(settings) as c:
            good = await c.call(
                "manage", {"job_type": "wk", "cache_prefix": "g", "payload": {"ok": True}}
            )
            bad = await c.call(
                "manage", {"job_type": "wk", "cache_prefix": "b", "payload": {"ok": False}}
            )
            for reply, want in ((good, "succeeded"), (bad, "failed")):
                for _ in range(100):
                    status = await c.call("status", {"job_id": reply["new_job_id"]})
                    if status["state"] == want:
                        break
                    await asyncio.sleep(0.1)
                assert status["state"] == want
        m = worker.metrics
        await asyncio.sleep(0.5)  # the finishing events are confirmed after the ack

        assert sample(m, "jlm_jobs_claimed_total", job_type="wk") == 2
        assert sample(m, "jlm_jobs_finished_total", job_type="wk", state="succeeded") == 1
        assert sample(m, "jlm_jobs_finished_total", job_type="wk", state="failed") == 1
        assert sample(m, "jlm_zombie_completions_total", job_type="wk") == 0
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await running.stop()


async def test_the_readiness_probe_is_not_counted_as_script_traffic(settings: Settings) -> None:
    """The monitor's script call every second stays out of jlm_redis_script_duration_seconds:
    only the requests' own `result` calls are counted."""
    running = await start_daemon(settings)
    try:
        m = running.service.metrics
        await asyncio.sleep(2.5)  # the monitor has probed Redis at least twice
        name = "jlm_redis_script_duration_seconds_count"
        assert sample(m, name, script="result") == 0
        async with Client(settings) as client:
            reply = await client.call("result", {"job_type": "demo", "cache_prefix": "job"})
        assert reply["success"] is True
        assert sample(m, name, script="result") == 1
    finally:
        await running.stop()
