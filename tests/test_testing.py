"""`jlm.testing.run_job`: a worker app's handlers run through claim → run → finish against the real
Redis, without RabbitMQ (no broker connection is made, no daemon runs)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from examples.app import app

from jlm.config import load_settings
from jlm.testing import run_job
from jlm.worker import App, Job

pytestmark = pytest.mark.timeout(60)


async def test_the_example_app_in_a_few_lines() -> None:
    ok = await run_job(app, "report.render", {"pages": 2})
    assert (ok.state, ok.result) == ("succeeded", {"report": "test", "pages": 2})
    assert (ok.progress or {}).get("message") == "page 2 of 2"
    bad = await run_job(app, "thumb.make", {"image": "cat.png", "width": 0})
    assert (bad.state, bad.attempts, bad.cached) == ("failed", 1, False)
    assert "greater than 0" in (bad.error or "")
    stop = await run_job(
        app, "report.render", {"pages": 99, "page_seconds": 0.05}, cancel_after=0.2
    )
    assert (stop.state, stop.cached) == ("cancelled", False)


async def test_retries_events_hooks_and_a_cancelled_handlers_cleanup(
    namespace: str, tmp_path: Any
) -> None:
    mine = App()
    seen: list[str] = []

    @mine.on_startup
    async def up(a: App) -> None:
        a.state.tries = 0

    @mine.on_shutdown
    async def down(a: App) -> None:
        seen.append(f"shutdown after {a.state.tries}")

    @mine.job("flaky")
    async def flaky(job: Job) -> dict[str, Any]:
        mine.state.tries += 1
        await job.progress(0.5, f"try {job.attempt}")
        if job.attempt < 3:
            raise RuntimeError(f"boom {job.attempt}")
        return {"attempt": job.attempt}

    @mine.job("slow")
    async def slow(job: Job) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cleaned up")
            raise

    config = tmp_path / "jlm.toml"
    config.write_text("[job_types.flaky]\nmax_attempts = 3\nretry_backoff = 5\nresult_ttl = 60\n")
    settings = load_settings({"JLM_CONFIG": str(config), "JLM_REDIS_NAMESPACE": namespace})
    t0 = time.monotonic()
    run = await run_job(mine, "flaky", {}, settings=settings)
    took = time.monotonic() - t0
    assert (run.state, run.attempts, run.result) == ("succeeded", 3, {"attempt": 3})
    types = [e["type"] for e in run.events]
    # Retries run at once here (no backoff); job.progress is allowed once a second per job.
    assert [t for t in types if t != "job.progress"] == ["job.enqueued"] + [
        "job.claimed",
        "job.failed",
    ] * 2 + ["job.claimed", "job.succeeded"]
    assert types[2] == "job.progress"
    assert 1 <= types.count("job.progress") <= 1 + took
    assert [h["state"] for h in run.history].count("running") == 3
    assert seen == ["shutdown after 3"]
    stopped = await run_job(mine, "slow", {}, cancel_after=0.1, startup=False)
    assert stopped.state == "cancelled"
    assert seen[-1] == "cleaned up"
    assert any("stopped by worker" in (h["reason"] or "") for h in stopped.history)


@pytest.mark.parametrize("fraction", [-0.1, 1.01, float("nan")])
async def test_progress_is_a_fraction_from_zero_to_one(fraction: float) -> None:
    job = Job("j", "t", "p", {}, 5, 1)
    with pytest.raises(ValueError, match="between 0 and 1"):
        await job.progress(fraction)
    assert await job.progress(1.0, "outside a run: nowhere to store it") is False
