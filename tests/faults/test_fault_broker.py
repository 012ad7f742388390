"""Scenario 4: the daemon's broker connection is cut (RST) and silently stalled (blackhole).

The daemon reaches the shared broker only through the test's TCP proxy; publishers connect
directly. A reset is seen at once; a stall only by heartbeats (JLM_HEARTBEAT=2 here). Either way
the daemon opens a new session and consumes again; the deliveries of the old channel are never
acked on the new one (their acks fail with the old channel and the broker redelivers them), so
the broker never closes a channel with PRECONDITION_FAILED "unknown delivery tag".
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from tests.faults.conftest import DaemonFactory
from tests.faults.load import Publisher, manage_request
from tests.faults.proxy import Proxy
from tests.support.daemon import DaemonProcess, exits, metric
from tests.support.ledger import account, collect, queue_count, unequal_replies
from tests.support.services import AMQP_BASE

from jlm.amqp.session import CLOSE_TIMEOUT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

HEARTBEAT = 2
JOB_TYPE = "fault-broker"
N = 1500
SCOPES = 50
BAD_SIGNS = ("PRECONDITION_FAILED", "unknown delivery tag", "CHANNEL_ERROR")


def proxied(proxy: Proxy, vhost: str) -> str:
    base = urlsplit(AMQP_BASE)
    return f"amqp://{base.username}:{base.password}@127.0.0.1:{proxy.port}/{vhost}"


async def reconnected(proxy: Proxy, daemon: DaemonProcess, before: int, timeout: float) -> float:
    """Seconds until the daemon opened a new connection through the proxy and is ready again."""
    started = time.monotonic()
    while proxy.accepted <= before:
        assert time.monotonic() - started < timeout, "the daemon never reconnected"
        await asyncio.sleep(0.02)
    detected = time.monotonic() - started
    await daemon.wait_ready(timeout)
    return detected


def noticed(daemon: DaemonProcess, text: str) -> float:
    """Wall-clock time of the first log record containing `text`."""
    for record in daemon.logs():
        if text in str(record.get("msg", "")):
            return datetime.fromisoformat(record["ts"]).timestamp()
    raise AssertionError(f"{daemon.name} never logged {text!r}")


def sessions(daemon: DaemonProcess) -> int:
    """Broker sessions opened (a probation session logs "consuming" twice, "connected" once)."""
    return sum(1 for r in daemon.logs() if str(r.get("msg", "")).startswith("connected to "))


async def test_broker_connection_reset_and_blackholed(
    spawn: DaemonFactory,
    proxy: Proxy,
    *,
    vhost: str,
    amqp_url: str,
    shared_redis: aioredis.Redis,
    namespace: str,
) -> None:
    daemon = spawn(
        "d", proxied(proxy, vhost), JLM_HEARTBEAT=str(HEARTBEAT), JLM_PREFETCH="64"
    ).start()
    await daemon.wait_ready()
    requests = [manage_request(f"b{i:05d}", JOB_TYPE, f"s{i % SCOPES}") for i in range(N)]
    ids = {r.message_id for r in requests}
    async with Publisher(amqp_url, "broker-faults", window=25) as pub:
        sending = asyncio.create_task(pub.send_all(requests, pace=0.05))

        while len(pub.replies) < N // 4:
            await asyncio.sleep(0.02)
        cut = proxy.reset()
        reset_detect = await reconnected(proxy, daemon, proxy.accepted, 30)

        while len(pub.replies) < N // 2:
            await asyncio.sleep(0.02)
        stalled = proxy.blackhole()
        stalled_wall = time.time()
        stall_restored = await reconnected(proxy, daemon, proxy.accepted, 60)
        stall_detect = noticed(daemon, "no answer from the broker") - stalled_wall

        await sending
        missing = await pub.wait_replies(ids, 120)
        replies = dict(pub.replies)
    assert not missing, f"{len(missing)} unanswered"
    text = await daemon.metrics()
    assert await daemon.terminate() == 0
    left = await queue_count(amqp_url, "jlm.requests")
    evidence = await collect(amqp_url, shared_redis, namespace, [f"jlm.jobs.{JOB_TYPE}"])
    acc = account(
        f"4 broker reset + blackhole (heartbeat {HEARTBEAT}s)",
        ids,
        replies,
        evidence,
        left,
        reset_detected_s=round(reset_detect, 2),
        stall_detected_s=round(stall_detect, 2),
        stall_consuming_again_s=round(stall_restored, 2),
        sessions=sessions(daemon),
        rabbitmq_retries=int(metric(text, "jlm_request_retries_total", dependency="rabbitmq")),
    )
    acc.report()
    assert cut >= 1
    assert stalled >= 1
    assert acc.lost == 0
    assert acc.duplicated_decisions == 0
    assert acc.decisions == acc.sent == acc.replied == acc.acked
    assert not unequal_replies(replies)
    # One session at the start and one after each fault: no channel was closed by the broker for
    # acking a stale delivery tag on a new channel (that would have cost another session).
    assert sessions(daemon) == 3
    logs = daemon.log_text()
    for sign in BAD_SIGNS:
        assert sign not in logs, sign
    # Two heartbeats, plus the probe's period (1 s) and some slack for a loaded machine.
    assert stall_detect <= 2 * HEARTBEAT + 2, "a stalled connection was not noticed in time"


async def test_sigterm_while_the_broker_connection_stalls_still_exits_0(
    spawn: DaemonFactory, proxy: Proxy, *, vhost: str
) -> None:
    """SIGTERM just after the connection went silent (heartbeat 10 s, as by default). The
    drain's consumer cancel waits on the stalled connection: the drain's bound ends it, where it
    used to wait until aiormq gave the connection up (33 s, past systemd's stop timeout) and then
    exit 1 with the CancelledError aiormq fails such calls with. The daemon exits 0 within its
    shutdown timeout plus the close's bound, with nothing critical in its log."""
    shutdown = 6
    daemon = spawn(
        "d", proxied(proxy, vhost), JLM_HEARTBEAT="10", JLM_SHUTDOWN_TIMEOUT=str(shutdown)
    ).start()
    await daemon.wait_ready()
    assert proxy.blackhole() >= 1
    await asyncio.sleep(0.1)
    started = time.monotonic()
    code = await daemon.terminate(timeout=60)
    took = time.monotonic() - started
    print(f"\nexit {code} {took:.1f}s after SIGTERM on a stalled connection")
    assert code == 0, exits([daemon], [code])
    logs = daemon.log_text()
    assert "stopped by an unexpected error" not in logs
    assert f"drain timed out: the broker did not answer within {shutdown}s" in logs
    assert took < shutdown + CLOSE_TIMEOUT + 3, "the drain outlived its bound"
