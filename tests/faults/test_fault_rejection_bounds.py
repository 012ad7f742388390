"""What a rejection leaves behind is bounded: 100 rejected 8 MiB requests through a running daemon.

Each body holds an 8 MiB object key the request model does not know, so that the error names it
(an error that echoed its input would be 8 MiB). Measured: the size of each error message, of each
`request.rejected` event, of each dead letter and of `jlm.dead` (bounded here to 16 MiB, oldest
dropped first), and the daemon's resident memory before and after.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import orjson
import pytest
from tests.faults.conftest import DaemonFactory
from tests.faults.load import Publisher
from tests.support.ledger import Accounting, drain, stream_events

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MIB = 1024 * 1024
N = 100
KEEP = 256 * 1024  # dead_letter_max_bytes
BOUND = 16 * MIB  # dead_letter_max_length_bytes
CONFIG = f"""
max_request_bytes = {16 * MIB}
dead_letter_max_bytes = {KEEP}
dead_letter_max_length_bytes = {BOUND}
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def list_queues(vhost: str, *columns: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "list_queues", "-p", vhost, "--quiet", "--no-table-headers", *columns],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


def queue_stats(vhost: str, queue: str) -> tuple[int, int]:
    out = list_queues(vhost, "name", "messages", "message_bytes")
    for line in out.splitlines():
        fields = line.split()
        if fields[0] == queue:
            return int(fields[1]), int(fields[2])
    raise AssertionError(f"no queue {queue}: {out}")


def queue_arguments(vhost: str, queue: str) -> str:
    out = list_queues(vhost, "name", "arguments")
    return next(line for line in out.splitlines() if line.split()[0] == queue)


def huge_key_body(n: int) -> bytes:
    head = b'{"job_type": "big", "payload": {}, "'
    tail = b'": %d}' % n
    return head + b"k" * (8 * MIB - len(head) - len(tail)) + tail


async def test_100_rejected_8mib_requests_leave_bounded_traces(
    spawn: DaemonFactory, amqp_url: str, vhost: str, tmp_path: Path
) -> None:
    config = tmp_path / "jlm.toml"
    config.write_text(CONFIG)
    daemon = spawn("b", amqp_url, JLM_CONFIG=str(config)).start()
    await daemon.wait_ready()
    assert daemon.proc is not None
    ids = [f"big{i}" for i in range(N)]
    async with Publisher(amqp_url, "big", declare=False) as pub:
        await pub.publish_raw("manage", huge_key_body(-1), correlation_id="warm", message_id="warm")
        assert not await pub.wait_replies({"warm"}, 60)
        await asyncio.sleep(3)  # settled: the start is a daemon that has seen one such request
        rss_start = rss_kib(daemon.proc.pid)
        for i, mid in enumerate(ids):
            await pub.publish_raw("manage", huge_key_body(i), correlation_id=mid, message_id=mid)
        missing = await pub.wait_replies(set(ids), 300)
        replies = dict(pub.replies)
    await asyncio.sleep(3)  # the last replies leave before their messages are freed
    rss_end = rss_kib(daemon.proc.pid)
    assert not missing, daemon.tail()
    messages = [replies[m][0]["error"]["message"] for m in ids]
    assert all(replies[m][0]["error"]["code"] == "invalid_request" for m in ids)
    longest_message = max(len(m.encode()) for m in messages)
    dead_count, dead_bytes = queue_stats(vhost, "jlm.dead")
    assert "drop-head" in queue_arguments(vhost, "jlm.dead")
    dead = await drain(amqp_url, "jlm.dead")
    events = [e for e in await stream_events(amqp_url) if e["type"] == "request.rejected"]
    largest_event = max(len(orjson.dumps(e)) for e in events)
    assert await daemon.ready()
    assert await daemon.terminate() == 0
    Accounting(
        "100 rejected 8 MiB requests",
        sent=N + 1,
        acked=N + 1,
        replied=len(replies),
        lost=len(missing),
        extra={
            "error_message_max_bytes": longest_message,
            "event_max_bytes": largest_event,
            "events": len(events),
            "jlm_dead_messages": dead_count,
            "jlm_dead_bytes": dead_bytes,
            "jlm_dead_bound": BOUND,
            "rss_start_kib": rss_start,
            "rss_end_kib": rss_end,
        },
    ).report()
    assert longest_message <= 1024
    assert len(events) == N + 1
    assert largest_event <= 8 * 1024
    assert dead_bytes <= BOUND
    # Oldest dropped first: what is left is the newest, each cut at dead_letter_max_bytes.
    assert 0 < len(dead) == dead_count < N
    assert [m.message_id for m in dead] == ids[N - len(dead) :]
    for m in dead:
        assert len(m.body) == KEEP
        assert m.headers["x-jlm-truncated"] is True
        assert m.headers["x-jlm-original-bytes"] == 8 * MIB
        assert m.body == huge_key_body(int(m.message_id[3:]))[:KEEP]
        assert len(str(m.headers["x-jlm-error-message"]).encode()) <= 1024
    assert rss_end <= rss_start * 1.1


async def test_an_unbounded_jlm_dead_from_an_older_version_is_used_and_named(
    spawn: DaemonFactory, amqp_url: str, vhost: str
) -> None:
    """Queue arguments cannot be changed on an existing queue: the daemon keeps the old jlm.dead,
    starts, dead-letters into it, and its warning names the policy that bounds it."""
    async with Publisher(amqp_url, "old", declare=False) as pub:
        assert pub._channel is not None
        await pub._channel.declare_queue("jlm.dead", durable=True)
    daemon = spawn("o", amqp_url).start()
    await daemon.wait_ready()
    async with Publisher(amqp_url, "old", declare=False) as pub:
        await pub.publish_raw("manage", b"nope", correlation_id="bad", message_id="bad")
        assert not await pub.wait_replies({"bad"}, 30)
    assert "drop-head" not in queue_arguments(vhost, "jlm.dead")
    assert [m.message_id for m in await drain(amqp_url, "jlm.dead")] == ["bad"]
    warning = next(r for r in daemon.logs() if "without a length bound" in str(r.get("msg")))
    assert "set_policy" in warning["msg"]
    assert "drop-head" in warning["msg"]
    assert await daemon.ready()
    assert await daemon.terminate() == 0
