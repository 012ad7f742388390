"""Debounce and delayed jobs with the real servers: a burst becomes one job, published once the
scope goes quiet; a scheduled job is cancelled, replaced and read like any other."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.amqp_helpers import read_stream
from tests.scheduled_helpers import JobWatcher
from tests.support.services import RunningDaemon, start_daemon

from jlm.client import Client
from jlm.config import Settings
from jlm.keys import Keys

pytestmark = pytest.mark.timeout(60)
QUEUE = "jlm.jobs.doc.render"


def manage(i: int, **extra: object) -> dict[str, object]:
    return {"job_type": "doc.render", "cache_prefix": "doc-7", "payload": {"edit": i}, **extra}


async def test_a_burst_becomes_one_job_published_after_the_quiet_time(
    daemon: RunningDaemon, client: Client, settings: Settings
) -> None:
    async with JobWatcher(settings.amqp_urls[0], QUEUE) as jobs:
        waiting = []
        started = time.time()
        for i in range(10):  # sent without waiting for the replies, 10 ms apart
            fut = await client.send("manage", manage(i, policy="debounce", debounce_ms=500))
            assert fut is not None
            waiting.append(fut)
            last = time.time()
            await asyncio.sleep(0.01)
        assert last - started < 0.3
        replies = await asyncio.wait_for(asyncio.gather(*waiting), 30)
        await asyncio.sleep(2.5)
    ids = {r["new_job_id"] for r in replies}
    assert len(ids) == 1, "the waiting job keeps one id through the burst"
    assert all(r["success"] and r["state"] == "scheduled" for r in replies)
    assert not any(r["deduplicated"] for r in replies)
    assert [a.body["job_id"] for a in jobs.arrivals] == list(ids)
    assert jobs.arrivals[0].body["payload"] == {"edit": 9}
    quiet = jobs.arrivals[0].at - last
    print(f"burst of 10 in {last - started:.3f} s; job published {quiet:.3f} s after the last")
    assert 0.5 <= quiet <= 1.5, f"published {quiet:.3f} s after the last request"
    status = await client.call("status", {"job_id": replies[0]["new_job_id"]})
    assert status["state"] == "pending"


async def test_max_wait_caps_a_burst_that_never_ends(
    daemon: RunningDaemon, client: Client, settings: Settings
) -> None:
    async with JobWatcher(settings.amqp_urls[0], QUEUE) as jobs:
        first = time.time()
        i = 0
        while time.time() - first < 2.5:  # a request every 100 ms: never 400 ms quiet
            await client.call(
                "manage", manage(i, policy="debounce", debounce_ms=400, max_wait_ms=1000)
            )
            i += 1
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)
    assert len(jobs.arrivals) >= 2, "the burst was published at most every max_wait_ms"
    first_wait = jobs.arrivals[0].at - first
    print(f"{i} requests in 2.5 s; {len(jobs.arrivals)} jobs, the first after {first_wait:.3f} s")
    assert 1.0 <= first_wait <= 2.0, f"first job published {first_wait:.3f} s after the burst began"
    assert jobs.arrivals[-1].body["payload"] == {"edit": i - 1}
    assert len(set(jobs.ids())) == len(jobs.arrivals)


async def test_cancel_of_a_scheduled_job_means_it_is_never_published(
    daemon: RunningDaemon, client: Client, settings: Settings
) -> None:
    async with JobWatcher(settings.amqp_urls[0], QUEUE) as jobs:
        reply = await client.call("manage", manage(1, policy="debounce", debounce_ms=300))
        job_id = reply["new_job_id"]
        cancelled = await client.call("cancel", {"job_id": job_id})
        assert cancelled["cancelled"] is True
        assert cancelled["state"] == "cancelled"
        await asyncio.sleep(1.5)
    assert jobs.arrivals == []
    status = await client.call("status", {"job_id": job_id})
    assert status["state"] == "cancelled"


async def test_not_before_holds_the_job_and_status_shows_when_it_is_due(
    daemon: RunningDaemon, client: Client, settings: Settings
) -> None:
    due = datetime.now(UTC) + timedelta(seconds=1.5)
    async with JobWatcher(settings.amqp_urls[0], QUEUE) as jobs:
        reply = await client.call("manage", manage(1, not_before=due.isoformat()))
        assert reply["state"] == "scheduled"
        status = await client.call("status", {"job_id": reply["new_job_id"]})
        assert status["state"] == "scheduled"
        due_at = datetime.fromisoformat(status["due_at"])
        assert abs((due_at - due).total_seconds()) < 0.002
        await asyncio.sleep(3)
    assert jobs.ids() == [reply["new_job_id"]]
    assert jobs.arrivals[0].at >= due.timestamp()


async def test_replace_supersedes_a_scheduled_job_and_skip_answers_with_it(
    daemon: RunningDaemon, client: Client, settings: Settings
) -> None:
    async with JobWatcher(settings.amqp_urls[0], QUEUE) as jobs:
        held = await client.call("manage", manage(1, policy="debounce", debounce_ms=5000))
        skipped = await client.call("manage", manage(2, policy="skip"))
        assert skipped["deduplicated"] is True
        assert skipped["new_job_id"] == held["new_job_id"]
        assert skipped["state"] == "scheduled"
        replaced = await client.call("manage", manage(3, policy="replace"))
        assert replaced["previous_job_id"] == held["new_job_id"]
        assert replaced["stale_cancelled"] is True
        assert replaced["state"] == "pending"
        await asyncio.sleep(0.5)
    assert jobs.ids() == [replaced["new_job_id"]]
    old = await client.call("status", {"job_id": held["new_job_id"]})
    assert old["state"] == "cancelled"
    assert old["superseded_by"] == replaced["new_job_id"]


async def test_debounce_needs_a_window(daemon: RunningDaemon, client: Client) -> None:
    reply = await client.call("manage", manage(1, policy="debounce"))
    assert reply["success"] is False
    assert reply["error"]["code"] == "invalid_request"
    assert "debounce_ms" in reply["error"]["message"]


async def test_events_say_scheduled_then_enqueued(
    daemon: RunningDaemon, client: Client, settings: Settings
) -> None:
    async with JobWatcher(settings.amqp_urls[0], QUEUE) as jobs:
        replies = [
            await client.call("manage", manage(i, policy="debounce", debounce_ms=300))
            for i in range(3)
        ]
        deadline = time.time() + 10
        while not jobs.arrivals and time.time() < deadline:
            await asyncio.sleep(0.1)
    job_id = replies[0]["new_job_id"]
    events = [e for e in await read_stream(settings) if e["job_id"] == job_id]
    assert [(e["type"], e["status"]) for e in events] == [
        ("job.scheduled", "scheduled"),
        ("job.scheduled", "scheduled"),
        ("job.scheduled", "scheduled"),
        ("job.enqueued", "pending"),
    ]
    assert [e["provenance_id"] for e in events[:3]] == [r["provenance_id"] for r in replies]
    assert events[3]["metadata"]["input"]["due_at"] == replies[-1]["due_at"]


async def test_the_job_type_sets_debounce_by_default(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    config = tmp_path / "jlm.toml"
    config.write_text(
        '[job_types."doc.render"]\npolicy = "debounce"\ndebounce_ms = 400\nmax_wait_ms = 9000\n'
    )
    settings = make_settings(JLM_CONFIG=str(config))
    daemon = await start_daemon(settings)
    try:
        async with Client(settings) as client, JobWatcher(settings.amqp_urls[0], QUEUE) as jobs:
            first = await client.call("manage", manage(1))
            second = await client.call("manage", manage(2))
            sent = time.time()
            assert first["state"] == second["state"] == "scheduled"
            assert first["new_job_id"] == second["new_job_id"]
            wait = datetime.fromisoformat(second["due_at"]).timestamp() - sent
            assert 0.2 < wait <= 0.4, wait
            replaced = await client.call("manage", manage(3, policy="replace"))
            assert replaced["state"] == "pending"
            await asyncio.sleep(1.5)
        assert jobs.ids() == [replaced["new_job_id"]]
    finally:
        await daemon.stop()


async def test_a_replayed_debounce_request_changes_nothing(
    daemon: RunningDaemon, client: Client, redis_client: Any, settings: Settings
) -> None:
    first = await client.call(
        "manage", manage(1, policy="debounce", debounce_ms=5000), message_id="edit-1"
    )
    job = Keys(settings.redis_namespace).job(first["new_job_id"])
    due = await redis_client.hget(job, "due")
    await asyncio.sleep(0.05)
    again = await client.call(
        "manage", manage(1, policy="debounce", debounce_ms=5000), message_id="edit-1"
    )
    assert again == first
    assert await redis_client.hget(job, "due") == due, "a replay does not restart the window"
    other = await client.call(
        "manage", manage(2, policy="debounce", debounce_ms=5000), message_id="edit-2"
    )
    assert other["new_job_id"] == first["new_job_id"]
    assert int(await redis_client.hget(job, "due")) > int(due)
