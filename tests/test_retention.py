"""Retention: a terminal job (succeeded, failed, cancelled) is kept `terminal_ttl`, a live one
`job_ttl`, its history with it; one test per path that ends a job, against the real Redis. A
dedup scope keeps at most `max_history_jobs` terminal jobs: the oldest beyond it go at once.

Jobs are made and moved by the daemon's own decisions (Lifecycle) and the worker's scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest
from bench.redisstats import manage_call
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from tests.support.redis_server import RedisServer
from tests.support.services import delete_namespace
from tests.test_worker_scripts import Scripts, T, run_of

import jlm.keys
from jlm.config import FileConfig, Settings
from jlm.errors import NotFound
from jlm.keys import Keys, scope_tag
from jlm.lifecycle import Context, Lifecycle
from jlm.metrics import Metrics
from jlm.protocol import StatusRequest
from jlm.states import LIVE, TERMINAL
from jlm.store import RedisClient, Store, connect
from jlm.worker.job import now
from jlm.worker.store import Run, WorkerStore

pytestmark = pytest.mark.timeout(60)
JOB_TTL = 100_000
TERMINAL_TTL = 600


async def _scripts(
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    namespace: str,
    redis_client: RedisClient,
    terminal_ttl: int,
    *,
    max_history_jobs: int = 100,
) -> AsyncIterator[Scripts]:
    config = tmp_path / "jlm.toml"
    config.write_text(
        f"job_ttl = {JOB_TTL}\nterminal_ttl = {terminal_ttl}\n"
        f"max_history_jobs = {max_history_jobs}\n"
    )
    settings = make_settings(JLM_CONFIG=str(config))
    metrics = Metrics()
    keys = Keys(namespace)
    store = Store(connect(settings.redis_url), keys, metrics)
    yield Scripts(
        WorkerStore(store, JOB_TTL, terminal_ttl, max_history_jobs),
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


# -- max_history_jobs: a bound on the terminal jobs of one scope ----------------------------------

KEPT = 3


@pytest.fixture
async def bounded(
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    namespace: str,
    redis_client: RedisClient,
) -> AsyncIterator[Scripts]:
    """Scripts of a daemon and a worker that keep at most KEPT terminal jobs per scope."""
    async for s in _scripts(
        make_settings, tmp_path, namespace, redis_client, TERMINAL_TTL, max_history_jobs=KEPT
    ):
        yield s


def ended_key(s: Scripts, prefix: str = "p") -> str:
    return s.keys.ended(scope_tag(prefix, T), prefix, T)


async def ended_ids(s: Scripts, prefix: str = "p") -> list[str]:
    """The scope's ended set, oldest first."""
    return [m.decode() for m in await s.redis.zrange(ended_key(s, prefix), 0, -1)]


async def assert_kept(s: Scripts, kept: list[str], gone: list[str]) -> None:
    """Each job of `kept` has its hash and history; each of `gone` has neither."""
    for job in kept:
        assert await s.redis.exists(s.keys.job(job), s.keys.history(job)) == 2, job
    for job in gone:
        assert await s.redis.exists(s.keys.job(job), s.keys.history(job)) == 0, job


async def test_a_scope_keeps_its_newest_terminal_jobs(bounded: Scripts) -> None:
    jobs = [await bounded.enqueue() for _ in range(10)]
    *superseded, current = jobs
    await assert_kept(bounded, [*superseded[-KEPT:], current], superseded[:-KEPT])
    for job in superseded[-KEPT:]:
        await assert_terminal(bounded, job, "cancelled")
    await assert_live(bounded, current, "pending")
    assert await ended_ids(bounded) == superseded[-KEPT:]
    assert 0 < await bounded.redis.ttl(ended_key(bounded)) <= TERMINAL_TTL


async def test_an_evicted_job_answers_status_as_an_expired_one(bounded: Scripts) -> None:
    jobs = [await bounded.enqueue() for _ in range(KEPT + 2)]
    evicted = jobs[0]
    await assert_kept(bounded, [], [evicted])
    never = f"{scope_tag('p', T)}-{'0' * 32}"
    for job in (evicted, never):
        with pytest.raises(NotFound, match=r"\(unknown, or expired\)") as caught:
            await bounded.lifecycle.status(StatusRequest(job_id=job), Context("r", False, None))
        assert caught.value.code == "not_found"
    # A cancel of it finds no job either, and the scope's current job is untouched.
    with pytest.raises(NotFound):
        await bounded.cancel(evicted)
    assert (await bounded.job(jobs[-1]))["state"] == "pending"


@pytest.mark.parametrize("one_tag", [False, True], ids=["own-tags", "one-tag"])
async def test_evictions_stay_within_their_scope(
    bounded: Scripts, monkeypatch: pytest.MonkeyPatch, one_tag: bool
) -> None:
    if one_tag:
        monkeypatch.setattr(jlm.keys, "TAG_BITS", 0)
        assert scope_tag("a", T) == scope_tag("b", T)
    others = [await bounded.enqueue("b") for _ in range(KEPT)]
    jobs = [await bounded.enqueue("a") for _ in range(3 * KEPT)]
    await assert_kept(bounded, others, [])
    assert await ended_ids(bounded, "b") == others[:-1]
    assert await ended_ids(bounded, "a") == jobs[-1 - KEPT : -1]
    await assert_kept(bounded, jobs[-1 - KEPT :], jobs[: -1 - KEPT])


async def test_every_path_that_ends_a_job_counts_toward_the_bound(bounded: Scripts) -> None:
    s, ended = bounded, []

    async def ends(job: str, state: str) -> None:
        """`job` has just ended in `state`: the scope keeps it and the KEPT - 1 before it."""
        ended.append(job)
        assert (await s.job(job))["state"] == state
        assert await ended_ids(s) == ended[-KEPT:]
        await assert_kept(s, ended[-KEPT:], ended[:-KEPT])

    ok = await s.enqueue()  # finish.lua: succeeded
    await s.finish(run_of(await s.claim(ok), ok), "succeeded", "1")
    await ends(ok, "succeeded")
    bad = await s.enqueue()  # finish.lua: failed, no attempt left
    await s.finish(run_of(await s.claim(bad), bad), "failed", "boom")
    await ends(bad, "failed")
    pending = await s.enqueue()  # cancel.lua: a pending job
    await s.cancel(pending)
    await ends(pending, "cancelled")
    running = await s.enqueue()  # cancel.lua: a running job, counted from its stop (finish.lua)
    run = run_of(await s.claim(running), running)
    await s.cancel(running)
    assert await ended_ids(s) == ended[-KEPT:]
    assert (await s.finish(run, "stopped")).o == "stopped"
    await ends(running, "cancelled")
    lost = await s.enqueue()  # claim.lua: a lost run without attempts left
    await s.claim(lost, lease_ms=30)
    await asyncio.sleep(0.06)
    assert (await s.claim(lost, "w2")).o == "lost"
    await ends(lost, "failed")
    given_back = await s.enqueue()  # release.lua: a run given back after it was superseded
    run = run_of(await s.claim(given_back), given_back)
    successor = await s.enqueue()
    assert (await s.ws.release(run, now(), "released")).o == "cancelled"
    await ends(given_back, "cancelled")
    # manage.lua: a running job cancelled by cancel_running, counted from its stop
    run = run_of(await s.claim(successor), successor)
    current = await s.enqueue(cancel_running=True)
    assert await ended_ids(s) == ended[-KEPT:]
    assert (await s.finish(run, "stopped")).o == "stopped"
    await ends(successor, "cancelled")
    await s.enqueue()  # manage.lua: a pending job superseded
    await ends(current, "cancelled")


@pytest.mark.parametrize("stop", ["finish", "release"])
async def test_a_job_cancelled_while_running_stays_until_its_stop_is_recorded(
    bounded: Scripts, stop: str
) -> None:
    """A job whose worker still holds its run is not counted, so the bound never deletes it
    before the stop is recorded on it; from its stop on it counts, as the newest."""
    s = bounded
    held = await s.enqueue()
    run = run_of(await s.claim(held), held)
    await s.cancel(held)
    later = [await s.enqueue() for _ in range(2 * KEPT)]  # each supersedes the one before
    *ended, current = later
    await assert_kept(s, [held, *ended[-KEPT:]], ended[:-KEPT])
    assert await ended_ids(s) == ended[-KEPT:]
    await assert_terminal(s, held, "cancelled")
    await assert_live(s, current, "pending")
    if stop == "finish":
        assert (await s.finish(run, "succeeded", "1")).o == "stopped"
    else:
        assert (await s.ws.release(run, now(), "released")).o == "stopped"
    assert "stopped_at" in await s.job(held)
    assert await ended_ids(s) == [*ended[-(KEPT - 1) :], held]
    await assert_kept(s, [*ended[-(KEPT - 1) :], held], ended[: -(KEPT - 1)])


async def test_a_cancelled_run_whose_lease_is_over_is_not_held(bounded: Scripts) -> None:
    """A worker that died while its job was cancelled holds nothing once its lease is over."""
    s = bounded
    job = await s.enqueue()
    await s.claim(job, lease_ms=30)
    await asyncio.sleep(0.06)
    await s.cancel(job)
    later = [await s.enqueue() for _ in range(KEPT + 1)]
    assert await ended_ids(s) == later[:KEPT]
    await assert_kept(s, later[:KEPT], [job])


async def test_the_bound_recorded_at_the_decision_applies_whoever_ends_the_job(
    bounded: Scripts,
) -> None:
    """claim, finish and release with the ARGV from before max_history_jobs (no bound passed):
    a job decided with a bound is counted by it all the same, so a worker's configuration
    cannot delete more of a scope than the daemon's. A job decided before the bound was
    recorded, ended by such a worker, is never counted."""
    s, k, tag = bounded, bounded.keys, scope_tag("p", T)
    store = s.ws.store

    async def old_claim(job: str) -> int:
        args = ["old", now(), 60_000, 1, 50, JOB_TTL, TERMINAL_TTL]
        claimed = orjson.loads(await store.run("claim", [k.job(job), k.history(job)], args))
        assert claimed["o"] == "claimed"
        return int(claimed["claim"])

    async def old_finish(job: str, outcome: str) -> None:
        claim = await old_claim(job)
        keys = [k.job(job), k.history(job), k.scope(tag, "p", T), k.result(tag, "p", T)]
        args = [outcome, "old", claim, now(), "1", 600, 1, job, 50, JOB_TTL, "stopped"]
        finished = orjson.loads(await store.run("finish", keys, [*args, TERMINAL_TTL]))
        assert finished["o"] == outcome
        await assert_terminal(s, job, outcome)

    unrecorded = []
    for outcome in ("succeeded", "failed"):
        job = await s.enqueue()
        assert await s.redis.hget(k.job(job), "max_history") == str(KEPT).encode()
        await s.redis.hdel(k.job(job), "max_history")  # as if decided before the bound
        await old_finish(job, outcome)
        unrecorded.append(job)
    assert await s.redis.exists(ended_key(s)) == 0
    counted = []
    for outcome in ("succeeded", "failed", "succeeded", "failed", "succeeded"):
        job = await s.enqueue()
        await old_finish(job, outcome)
        counted.append(job)
    given_back = await s.enqueue()
    claim = await old_claim(given_back)
    await s.enqueue()  # supersedes the running job: released, it ends cancelled
    args = ["old", claim, now(), "released", 50, JOB_TTL, TERMINAL_TTL]
    released = await store.run("release", [k.job(given_back), k.history(given_back)], args)
    assert orjson.loads(released)["o"] == "cancelled"
    counted.append(given_back)
    assert await ended_ids(s) == counted[-KEPT:]
    await assert_kept(s, unrecorded + counted[-KEPT:], counted[:-KEPT])


async def _bound_step(
    s: Scripts, n: int, op: tuple[Any, ...], jobs: list[str], runs: dict[str, Run]
) -> None:
    """Apply one drawn step (BOUND_OPS) to the scope."""
    if op[0] == "manage":
        jobs.append(await s.enqueue(cancel_running=op[1]))
        return
    if not jobs:
        return
    job = jobs[-1 - op[1] % len(jobs)]
    if op[0] == "claim":
        facts = await s.claim(job, f"w{n}", lease_ms=op[2], max_attempts=2)
        if facts.o == "claimed":
            runs[job] = run_of(facts, job, f"w{n}")
    elif op[0] == "finish" and job in runs:
        await s.finish(runs[job], op[2], '"v"', max_attempts=2)
    elif op[0] == "cancel":
        with contextlib.suppress(NotFound):  # an evicted job
            await s.cancel(job)
    elif op[0] == "release" and job in runs:
        await s.ws.release(runs[job], now(), "r")


async def held_runs(s: Scripts, jobs: list[str]) -> set[str]:
    """The jobs of `jobs` a run still holds: an owner whose lease is not over (Redis time)."""
    secs, micros = await s.redis.time()
    now_ms = secs * 1000 + micros // 1000
    held = set()
    for j in jobs:
        owner, lease = await s.redis.hmget(s.keys.job(j), "owner", "lease_until")
        if owner and int(lease or 0) > now_ms:
            held.add(j)
    return held


async def _check_bound(
    s: Scripts, kept: int, jobs: list[str], counted: list[str], held_before: set[str]
) -> set[str]:
    """The scope's terminal jobs after a step. `counted` gains the jobs counted in it: those that
    became terminal, and those whose held run stopped. Returns the held runs' jobs now."""
    states = {j: (await s.job(j)).get("state") for j in jobs}
    held = await held_runs(s, [j for j in jobs if states[j] in TERMINAL])
    for j in held_before:
        assert states[j] is not None, "a job whose run a worker holds is never deleted"
    for j in jobs:
        if j not in counted and states[j] in TERMINAL and j not in held:
            counted.append(j)
        if j not in counted:
            assert states[j] is not None, "only a terminal job is ever deleted"
    terminal = {j for j in jobs if states[j] in TERMINAL and j not in held}
    assert len(terminal) <= kept, "a scope keeps at most max_history_jobs terminal jobs"
    assert terminal == set(counted[-kept:]), "the newest terminal jobs are the ones kept"
    for j in counted[:-kept]:
        assert await s.redis.exists(s.keys.job(j), s.keys.history(j)) == 0
    members = [m.decode() for m in await s.redis.zrange(ended_key(s), 0, -1)]
    assert members == counted[-kept:]
    current = (await s.redis.hget(s.keys.scope(scope_tag("p", T), "p", T), "job") or b"").decode()
    if states.get(current) in LIVE:
        assert current not in members, "the scope's live job is never in its ended set"
    return held


# A step on one scope: (manage, cancel_running) | (claim, job, lease ms) | (finish, job, outcome) |
# (cancel, job) | (release, job); a job is picked from the newest back. `manage` is drawn twice as
# often: each one can end a job.
MANAGE = st.tuples(st.just("manage"), st.booleans())
BOUND_OPS = st.lists(
    st.one_of(
        MANAGE,
        MANAGE,
        st.tuples(st.just("claim"), st.integers(0, 3), st.sampled_from([0, 60_000])),
        st.tuples(st.just("finish"), st.integers(0, 3), st.sampled_from(["succeeded", "failed"])),
        st.tuples(st.just("cancel"), st.integers(0, 3)),
        st.tuples(st.just("release"), st.integers(0, 3)),
    ),
    min_size=10,
    max_size=30,
)


@hsettings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(kept=st.integers(1, 3), ops=BOUND_OPS)
def test_any_sequence_keeps_a_scope_within_its_bound(
    settings: Settings, module_redis: RedisServer, kept: int, ops: list[tuple[Any, ...]]
) -> None:
    file = settings.file.model_copy(update={"max_history_jobs": kept})
    asyncio.run(
        _bounded(settings.model_copy(update={"redis_url": module_redis.url, "file": file}), ops)
    )


async def _bounded(settings: Settings, ops: list[tuple[Any, ...]]) -> None:
    kept = settings.file.max_history_jobs
    namespace = f"jlmp{uuid.uuid4().hex[:10]}"
    metrics = Metrics()
    keys = Keys(namespace)
    store = Store(connect(settings.redis_url), keys, metrics)
    redis = connect(settings.redis_url)
    file = settings.file
    s = Scripts(
        WorkerStore(store, file.job_ttl, file.terminal_ttl, kept),
        Lifecycle(store, settings, metrics),
        redis,
        keys,
    )
    jobs: list[str] = []
    runs: dict[str, Run] = {}
    counted: list[str] = []  # terminal jobs in the order they counted toward the bound
    held: set[str] = set()  # cancelled jobs whose run a worker holds: not counted yet
    try:
        for n, op in enumerate(ops):
            await _bound_step(s, n, op, jobs, runs)
            held = await _check_bound(s, kept, jobs, counted, held)
            if held:
                event("a cancelled job's run held")
        event(f"terminal jobs deleted: {len(counted) > kept}")
    finally:
        await delete_namespace(redis, namespace)
        await redis.aclose()
        await store.close()
