"""Retention: a terminal job (succeeded, failed, cancelled) is kept `terminal_ttl`, a live one
`job_ttl`, its history with it; one test per path that ends a job, against the real Redis.

Jobs are made and moved by the daemon's own decisions (Lifecycle) and the worker's scripts.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import orjson
import pytest
from bench.redisstats import manage_call
from tests.test_worker_scripts import Scripts, T, run_of

from jlm.config import FileConfig, Settings
from jlm.errors import NotFound
from jlm.keys import Keys, scope_tag
from jlm.lifecycle import Context, Lifecycle
from jlm.metrics import Metrics
from jlm.protocol import StatusRequest
from jlm.store import RedisClient, Store, connect
from jlm.worker.job import now
from jlm.worker.store import WorkerStore

pytestmark = pytest.mark.timeout(60)
JOB_TTL = 100_000
TERMINAL_TTL = 600


async def _scripts(
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    namespace: str,
    redis_client: RedisClient,
    terminal_ttl: int,
) -> AsyncIterator[Scripts]:
    config = tmp_path / "jlm.toml"
    config.write_text(f"job_ttl = {JOB_TTL}\nterminal_ttl = {terminal_ttl}\n")
    settings = make_settings(JLM_CONFIG=str(config))
    metrics = Metrics()
    keys = Keys(namespace)
    store = Store(connect(settings.redis_url), keys, metrics)
    yield Scripts(
        WorkerStore(store, JOB_TTL, terminal_ttl),
        Lifecycle(store, settings, metrics),
        redis_client,
        keys,
    )
    await store.close()


@pytest.fixture
async def scripts(
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    namespace: str,
    redis_client: RedisClient,
) -> AsyncIterator[Scripts]:
    async for s in _scripts(make_settings, tmp_path, namespace, redis_client, TERMINAL_TTL):
        yield s


async def _ttls(s: Scripts, job: str) -> tuple[int, int]:
    return await s.redis.ttl(s.keys.job(job)), await s.redis.ttl(s.keys.history(job))


async def kept_for(s: Scripts, job: str, state: str, low: int, high: int) -> None:
    """The job is in `state`, and its hash and history expire in (low, high] seconds."""
    assert (await s.job(job))["state"] == state
    for ttl in await _ttls(s, job):
        assert low < ttl <= high, (state, ttl)


async def assert_terminal(s: Scripts, job: str, state: str) -> None:
    await kept_for(s, job, state, 0, TERMINAL_TTL)


async def assert_live(s: Scripts, job: str, state: str) -> None:
    await kept_for(s, job, state, JOB_TTL - 60, JOB_TTL)


async def test_a_superseded_pending_job_is_terminal_at_once(scripts: Scripts) -> None:
    old = await scripts.enqueue()
    await assert_live(scripts, old, "pending")
    new = await scripts.enqueue()
    await assert_terminal(scripts, old, "cancelled")
    await assert_live(scripts, new, "pending")


async def test_a_running_job_superseded_stays_live_unless_cancelled(scripts: Scripts) -> None:
    kept = await scripts.enqueue("k")
    await scripts.claim(kept)
    await scripts.enqueue("k")
    await assert_live(scripts, kept, "running")
    stopped = await scripts.enqueue("c")
    await scripts.claim(stopped)
    await scripts.enqueue("c", cancel_running=True)
    await assert_terminal(scripts, stopped, "cancelled")


async def test_a_new_request_does_not_lengthen_a_finished_jobs_stay(scripts: Scripts) -> None:
    done = await scripts.enqueue()
    await scripts.finish(run_of(await scripts.claim(done), done), "succeeded", "1")
    await assert_terminal(scripts, done, "succeeded")
    await scripts.enqueue()
    await assert_terminal(scripts, done, "succeeded")


@pytest.mark.parametrize("running", [False, True])
async def test_cancel_makes_a_job_terminal(scripts: Scripts, running: bool) -> None:
    job = await scripts.enqueue()
    if running:
        await scripts.claim(job)
    await scripts.cancel(job)
    await assert_terminal(scripts, job, "cancelled")


async def test_finish_keeps_a_job_by_its_state_after(scripts: Scripts) -> None:
    ok = await scripts.enqueue("s")
    await scripts.finish(run_of(await scripts.claim(ok), ok), "succeeded", "1", prefix="s")
    await assert_terminal(scripts, ok, "succeeded")
    job = await scripts.enqueue("f")
    facts = await scripts.claim(job, max_attempts=2)
    await scripts.finish(run_of(facts, job), "failed", "e1", prefix="f", max_attempts=2)
    await assert_live(scripts, job, "pending")  # a retry is live again
    facts = await scripts.claim(job, max_attempts=2)
    await scripts.finish(run_of(facts, job), "failed", "e2", prefix="f", max_attempts=2)
    await assert_terminal(scripts, job, "failed")
    # A stop recorded after a cancellation renews a terminal job's stay, never a live one's.
    cancelled = await scripts.enqueue("c")
    run = run_of(await scripts.claim(cancelled), cancelled)
    await scripts.cancel(cancelled)
    assert (await scripts.finish(run, "stopped", prefix="c")).o == "stopped"
    await assert_terminal(scripts, cancelled, "cancelled")


async def test_release_keeps_a_job_by_its_state_after(scripts: Scripts) -> None:
    back = await scripts.enqueue("b")
    run = run_of(await scripts.claim(back), back)
    assert (await scripts.ws.release(run, now(), "released")).o == "released"
    await assert_live(scripts, back, "pending")
    superseded = await scripts.enqueue("s")
    run = run_of(await scripts.claim(superseded), superseded)
    await scripts.enqueue("s")
    assert (await scripts.ws.release(run, now(), "released")).o == "cancelled"
    await assert_terminal(scripts, superseded, "cancelled")
    stopped = await scripts.enqueue("x")
    run = run_of(await scripts.claim(stopped), stopped)
    await scripts.cancel(stopped)
    assert (await scripts.ws.release(run, now(), "released")).o == "stopped"
    await assert_terminal(scripts, stopped, "cancelled")


@pytest.mark.parametrize(("superseded", "state"), [(False, "failed"), (True, "cancelled")])
async def test_a_lost_run_found_by_claim_is_terminal(
    scripts: Scripts, superseded: bool, state: str
) -> None:
    job = await scripts.enqueue()
    await scripts.claim(job, lease_ms=30)
    await assert_live(scripts, job, "running")
    if superseded:
        await scripts.enqueue()
    await asyncio.sleep(0.06)
    assert (await scripts.claim(job, "w2")).o == "lost"
    await assert_terminal(scripts, job, state)


async def test_a_terminal_job_is_gone_after_terminal_ttl(
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    namespace: str,
    redis_client: RedisClient,
) -> None:
    async for s in _scripts(make_settings, tmp_path, namespace, redis_client, 1):
        old = await s.enqueue()
        new = await s.enqueue()
        await asyncio.sleep(2.2)
        assert await s.redis.exists(s.keys.job(old), s.keys.history(old)) == 0
        with pytest.raises(NotFound):
            await s.lifecycle.status(StatusRequest(job_id=old), Context("r", False, None))
        # The scope's live job stays.
        assert (await s.job(new))["state"] == "pending"
        assert len(await s.history(new)) == 1


async def test_a_worker_that_passes_no_terminal_ttl_still_works(scripts: Scripts) -> None:
    """The ARGV of claim, finish and release before terminal_ttl: ended jobs keep job_ttl."""
    job = await scripts.enqueue()
    k = scripts.keys
    job_keys = [k.job(job), k.history(job)]
    claimed = orjson.loads(
        await scripts.ws.store.run("claim", job_keys, ["old", now(), 60_000, 1, 50, JOB_TTL])
    )
    assert claimed["o"] == "claimed"
    tag = scope_tag("p", T)
    finished = await scripts.ws.store.run(
        "finish",
        [*job_keys, k.scope(tag, "p", T), k.result(tag, "p", T)],
        ["failed", "old", claimed["claim"], now(), "boom", 600, 1, job, 50, JOB_TTL, "stopped"],
    )
    assert orjson.loads(finished)["o"] == "failed"
    await kept_for(scripts, job, "failed", JOB_TTL - 60, JOB_TTL)


def test_the_bench_passes_manage_lua_every_argv() -> None:
    """bench.redisstats.manage_call mirrors Lifecycle.manage: an ARGV added to manage.lua must
    reach it too, or the bench would measure a script called wrongly."""
    text = resources.files("jlm").joinpath("lua", "manage.lua").read_text(encoding="utf-8")
    header = "\n".join(itertools.takewhile(lambda line: line.startswith("--"), text.splitlines()))
    documented = max(int(n) for n in re.findall(r"ARGV\[(\d+)\]", header))
    keys, args = manage_call(Keys("x"), FileConfig(), 0, datetime.now(UTC))
    assert (len(keys), len(args)) == (6, documented)
