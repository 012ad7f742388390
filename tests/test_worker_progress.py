"""`await job.progress(fraction, message)`: stored on the job (the `status` reply, `jlm status`),
a `job.progress` event at most once a second per job, refused once the job was superseded. Real
`jlm worker` processes, the daemon, Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from datetime import datetime
from pathlib import Path

import orjson
import pytest
from tests.amqp_helpers import read_stream
from tests.support.daemon import env_for
from tests.support.services import RunningDaemon
from tests.test_worker import ROOT, Env, until

from jlm.client import Client
from jlm.config import Settings
from jlm.store import RedisClient


@pytest.fixture
async def env(  # noqa: PLR0917 - fixtures arrive as parameters
    daemon: RunningDaemon,
    client: Client,
    settings: Settings,
    redis_client: RedisClient,
    namespace: str,
    tmp_path: Path,
) -> Env:
    return Env(daemon, client, settings, redis_client, namespace, tmp_path)


async def reported(env: Env, job: str) -> list[int]:
    return [int(v) for v in await env.redis.lrange(env.key(f"progress:{job}"), 0, -1)]


async def test_progress_is_in_the_status_reply_and_jlm_status_as_soon_as_reported(env: Env) -> None:
    async with env.workers("progressing"):
        job = await env.submit("p1", payload={"steps": 3, "hold": True})
        await until(lambda: len_at_least(env, job, 3), 10, "three progress reports")
        t0 = time.monotonic()
        status = await env.status(job)
        seen_in = time.monotonic() - t0
        assert status["state"] == "running"
        progress = status["progress"]
        assert set(progress) == {"fraction", "message", "at"}
        assert (progress["fraction"], progress["message"]) == (0.5, "step 3 of 3")
        datetime.fromisoformat(progress["at"])
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "jlm", "status", job),
            env=env_for(env.settings),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0
        shown = stdout.decode()
        assert f"progress 50% step 3 of 3 (at {progress['at']})" in shown, shown
        await env.redis.set(env.key(f"go:{job}"), 1)
        done = await until(lambda: env.status_is(job, "succeeded"), 10, "the job")
        assert (done["progress"]["fraction"], done["progress"]["message"]) == (1.0, "after go")
        assert await reported(env, job) == [1, 1, 1, 1]
        print(f"\nprogress: in the status reply {seen_in * 1000:.0f} ms after the 3rd report")


async def len_at_least(env: Env, job: str, n: int) -> bool:
    return len(await reported(env, job)) >= n


async def test_progress_events_come_at_most_once_a_second_per_job(env: Env) -> None:
    steps, every = 30, 0.1
    async with env.workers("progressing"):
        job = await env.submit("p2", payload={"steps": steps, "every": every})
        await until(lambda: env.status_is(job, "succeeded"), 20, "the job")
        await asyncio.sleep(0.3)
    assert await reported(env, job) == [1] * steps
    events = [e for e in await read_stream(env.settings) if e["job_id"] == job]
    types = [e["type"] for e in events]
    progress = [e for e in events if e["type"] == "job.progress"]
    assert types.index("job.claimed") < types.index("job.progress")
    assert types.index("job.progress") < types.index("job.succeeded")
    assert types[-1] == "job.succeeded"
    at = [datetime.fromisoformat(e["metadata"]["output"]["at"]) for e in progress]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(at)]
    span = (at[-1] - at[0]).total_seconds()
    # 30 reports over about 3 s: the first is published, then one a second at most.
    assert 2 <= len(progress) <= span + 1, (len(progress), span)
    assert min(gaps) >= 0.98, gaps  # Redis's clock decides; the worker stamps `at` (one host)
    first = progress[0]
    assert first["status"] == "running"
    assert first["metadata"]["output"]["message"] == "step 1 of 30"
    assert set(first["metadata"]["input"]) == {"worker", "attempt"}
    print(f"\n{steps} reports {every} s apart: {len(progress)} job.progress events, gaps {gaps} s")


async def test_progress_after_the_job_was_superseded_is_refused(env: Env) -> None:
    async with env.workers("progressing", concurrency=2):
        old = await env.submit("p3", payload={"steps": 1, "hold": True})
        await until(lambda: len_at_least(env, old, 1), 10, "the first report")
        new = await env.submit("p3", payload={"steps": 1})
        await env.redis.set(env.key(f"go:{old}"), 1)
        await until(lambda: len_at_least(env, old, 2), 10, "the report after the supersede")
        assert await reported(env, old) == [1, 0]
        status = await until(lambda: env.status_is(old, "succeeded"), 10, "the old job")
        assert status["superseded_by"] == new
        assert (status["progress"]["fraction"], status["progress"]["message"]) == (
            0.5,
            "step 1 of 1",
        )
        await until(lambda: env.status_is(new, "succeeded"), 10, "the new job")


async def test_submit_until_done_reports_the_latest_progress(env: Env) -> None:
    async with env.workers("progressing"):
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "jlm", "submit", "wtest", "--prefix", "p4", "--json"),
            *("--payload", '{"steps": 2, "every": 0.4}', "--until-done"),
            env=env_for(env.settings),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    out = orjson.loads(stdout)
    assert (out["state"], out["result"]) == ("succeeded", {"steps": 2})
    assert (out["progress"]["fraction"], out["progress"]["message"]) == (0.5, "step 2 of 2")
