"""The worker side of scheduled jobs needs no change: a debounced or delayed job, once published,
is claimed and run once like any pending job (the `jlm worker` SDK, real processes)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from tests.test_worker import Env, env, until  # noqa: F401 - the fixture is collected here too

pytestmark = pytest.mark.timeout(90)


async def test_a_debounced_burst_runs_once_with_its_last_payload(env: Env) -> None:  # noqa: F811 - env, the imported fixture
    async with env.workers("count"):
        ids = {
            await env.submit("d1", payload={"v": i}, policy="debounce", debounce_ms=300)
            for i in range(3)
        }
        assert len(ids) == 1
        (job_id,) = ids
        await until(lambda: env.status_is(job_id, "succeeded"), 30, "the debounced job to run")
        assert await env.runs() == {job_id: 1}
        result = await env.result("d1")
        assert result["job_id"] == job_id
        assert result["result"] == {"job": job_id, "echo": {"v": 2}}


async def test_a_delayed_job_does_not_start_before_its_time(env: Env) -> None:  # noqa: F811 - env, the imported fixture
    async with env.workers("count"):
        # Taken after the worker has started, which can take seconds on a busy machine: a time
        # already past when the request is decided makes the job pending at once (no schedule).
        not_before = datetime.now(UTC) + timedelta(seconds=2)
        job_id = await env.submit("d2", not_before=not_before.isoformat())
        await until(lambda: env.status_is(job_id, "succeeded"), 30, "the delayed job to run")
        history = (await env.status(job_id))["history"]
        assert [h["state"] for h in history] == ["scheduled", "pending", "running", "succeeded"]
        started = datetime.fromisoformat(history[2]["at"])
        assert started >= not_before, f"started at {started}, due at {not_before}"
        assert time.time() >= not_before.timestamp()
        assert await env.runs() == {job_id: 1}
