"""claim.lua, heartbeat.lua, finish.lua and release.lua, called directly against the real Redis.

Jobs are made by the daemon's own decisions (Lifecycle → manage.lua, cancel.lua), so every state a
worker meets is one the daemon really writes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
import pytest
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from tests.support.redis_server import RedisServer
from tests.support.services import delete_namespace

from jlm.config import Settings
from jlm.keys import Keys, new_job_id, scope_tag
from jlm.lifecycle import Context, Lifecycle
from jlm.metrics import Metrics
from jlm.protocol import CancelRequest, ManageRequest
from jlm.store import RedisClient, Store, connect
from jlm.worker.job import now
from jlm.worker.store import Facts, Run, WorkerStore

pytestmark = pytest.mark.timeout(60)
T = "unit"
LONG = 60_000


@dataclass
class Scripts:
    ws: WorkerStore
    lifecycle: Lifecycle
    redis: RedisClient
    keys: Keys

    async def enqueue(self, prefix: str = "p", *, cancel_running: bool = False) -> str:
        req = ManageRequest(
            job_type=T, payload={}, cache_prefix=prefix, cancel_running=cancel_running
        )
        out = await self.lifecycle.manage(req, Context(uuid.uuid4().hex, False, None))
        return str(out.reply["new_job_id"])

    async def cancel(self, job_id: str, running: bool = True) -> None:
        req = CancelRequest(job_id=job_id, running=running)
        await self.lifecycle.cancel(req, Context(uuid.uuid4().hex, False, None))

    async def claim(
        self,
        job_id: str,
        owner: str = "w1",
        *,
        lease_ms: int = LONG,
        max_attempts: int = 1,
    ) -> Facts:
        return await self.ws.claim(
            job_id, owner, now(), lease_ms=lease_ms, max_attempts=max_attempts
        )

    async def finish(
        self, run: Run, outcome: str, value: str = "", *, prefix: str = "p", max_attempts: int = 1
    ) -> Facts:
        return await self.ws.finish(
            run, (prefix, T), outcome, now(), value, result_ttl=600, max_attempts=max_attempts
        )

    async def job(self, job_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self.keys.job(job_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def history(self, job_id: str) -> list[str]:
        raw = await self.redis.lrange(self.keys.history(job_id), 0, -1)
        return [orjson.loads(h)["reason"] for h in raw]

    async def result(self, prefix: str = "p") -> dict[str, str]:
        tag = scope_tag(prefix, T)
        raw = await self.redis.hgetall(self.keys.result(tag, prefix, T))
        return {k.decode(): v.decode() for k, v in raw.items()}


def _connect(settings: Settings) -> RedisClient:
    """A client of the test's Redis: the shared one, or a cluster where the module sets one."""
    return connect(settings.redis_url, cluster=settings.redis_cluster)


@pytest.fixture
async def scripts(
    settings: Settings, namespace: str, redis_client: RedisClient
) -> AsyncIterator[Scripts]:
    metrics = Metrics()
    keys = Keys(namespace)
    store = Store(_connect(settings), keys, metrics)
    yield Scripts(
        WorkerStore(
            store, settings.file.job_ttl, settings.file.terminal_ttl, settings.file.max_history_jobs
        ),
        Lifecycle(store, settings, metrics),
        redis_client,
        keys,
    )
    await store.close()


def run_of(facts: Facts, job_id: str, owner: str = "w1") -> Run:
    return Run(job_id, owner, int(facts.get("claim")))


async def test_claim_takes_a_pending_job_once(scripts: Scripts) -> None:
    job = await scripts.enqueue()
    first = await scripts.claim(job)
    assert first.o == "claimed"
    assert (first.get("attempt"), first.get("claim"), first.get("recovered")) == (1, 1, False)
    assert (first.get("job_type"), first.get("cache_prefix"), first.get("priority")) == (T, "p", 5)
    record = await scripts.job(job)
    assert (record["state"], record["owner"], record["attempt"]) == ("running", "w1", "1")
    # Another claim (a redelivered message) waits for the live lease instead of running it again.
    again = await scripts.claim(job, "w2")
    assert again.o == "wait"
    assert 0 < again.get("wait_ms") <= LONG
    assert again.get("owner") == "w1"
    assert (await scripts.job(job))["owner"] == "w1"


async def test_claim_skips_what_must_not_run(scripts: Scripts) -> None:
    superseded = await scripts.enqueue("s")
    await scripts.enqueue("s")
    assert (await scripts.claim(superseded)).get("reason") == "cancelled"
    unknown = new_job_id(scope_tag("nowhere", T))
    assert (await scripts.claim(unknown)).get("reason") == "unknown"
    done = await scripts.enqueue("d")
    facts = await scripts.claim(done)
    assert (
        await scripts.finish(run_of(facts, done), "succeeded", "1", prefix="d")
    ).o == "succeeded"
    assert (await scripts.claim(done)).get("reason") == "succeeded"
    # A retried job is pending again: whichever of its messages comes first claims it (the claim
    # reads no header), and any other copy then finds it running or finished.
    retried = await scripts.enqueue("r")
    facts = await scripts.claim(retried, max_attempts=2)
    again = await scripts.finish(
        run_of(facts, retried), "failed", "boom", prefix="r", max_attempts=2
    )
    assert (again.o, again.state, again.get("gen")) == ("retry", "pending", 1)
    second = await scripts.claim(retried, "w2", max_attempts=2)
    assert (second.o, second.get("attempt")) == ("claimed", 2)
    assert (await scripts.claim(retried, "w3", max_attempts=2)).o == "wait"


@pytest.mark.parametrize(("max_attempts", "state"), [(2, "running"), (1, "failed")])
async def test_an_expired_lease_means_a_lost_worker(
    scripts: Scripts, max_attempts: int, state: str
) -> None:
    job = await scripts.enqueue()
    first = await scripts.claim(job, lease_ms=30, max_attempts=max_attempts)
    await asyncio.sleep(0.06)
    second = await scripts.claim(job, "w2", max_attempts=max_attempts)
    assert second.state == state
    record = await scripts.job(job)
    assert record["state"] == state
    if max_attempts == 2:
        assert (second.o, second.get("attempt"), second.get("recovered")) == ("claimed", 2, True)
        assert record["owner"] == "w2"
    else:
        assert second.o == "lost"
        assert record["error"] == "worker lost"
        assert "owner" not in record
    # The first run is over: its heartbeat and its result are refused.
    old = run_of(first, job)
    assert await scripts.ws.heartbeat(old, LONG) == ("lost" if max_attempts == 2 else "failed")
    assert (await scripts.finish(old, "succeeded", "1")).o == "refused"
    assert await scripts.result() == {}


async def test_a_superseded_running_job_of_a_lost_worker_is_not_run_again(
    scripts: Scripts,
) -> None:
    job = await scripts.enqueue()
    await scripts.claim(job, lease_ms=30, max_attempts=3)
    await scripts.enqueue()  # supersedes it while running
    await asyncio.sleep(0.06)
    lost = await scripts.claim(job, "w2", max_attempts=3)
    assert (lost.o, lost.state) == ("lost", "cancelled")


async def test_heartbeat_renews_only_its_own_run_and_reports_a_cancellation(
    scripts: Scripts,
) -> None:
    job = await scripts.enqueue()
    facts = await scripts.claim(job, lease_ms=1000)
    run = run_of(facts, job)
    before = int((await scripts.job(job))["lease_until"])
    assert await scripts.ws.heartbeat(run, LONG) == "running"
    assert int((await scripts.job(job))["lease_until"]) > before + 30_000
    assert await scripts.ws.heartbeat(Run(job, "w2", run.claim), LONG) == "lost"
    assert await scripts.ws.heartbeat(Run(job, "w1", run.claim + 1), LONG) == "lost"
    await scripts.cancel(job)
    assert await scripts.ws.heartbeat(run, LONG) == "cancelled"
    gone = new_job_id(scope_tag("gone", T))
    assert await scripts.ws.heartbeat(Run(gone, "w1", 1), LONG) == "unknown"


async def test_finish_caches_a_result_with_its_state_and_ttl(scripts: Scripts) -> None:
    job = await scripts.enqueue()
    run = run_of(await scripts.claim(job), job)
    done = await scripts.finish(run, "succeeded", '{"ok":true}')
    assert (done.o, done.state, done.get("cached")) == ("succeeded", "succeeded", True)
    assert await scripts.result() == {
        "job": job,
        "value": '{"ok":true}',
        "at": (await scripts.job(job))["finished_at"],
    }
    tag = scope_tag("p", T)
    assert 590 < await scripts.redis.ttl(scripts.keys.result(tag, "p", T)) <= 600
    record = await scripts.job(job)
    assert record["state"] == "succeeded"
    assert "owner" not in record
    assert (await scripts.finish(run, "succeeded", "2")).o == "refused"  # once only


async def test_a_superseded_job_cannot_overwrite_its_successors_result(scripts: Scripts) -> None:
    old = await scripts.enqueue()
    old_run = run_of(await scripts.claim(old), old)
    new = await scripts.enqueue()  # the old job keeps running, superseded
    new_run = run_of(await scripts.claim(new, "w2"), new, "w2")
    assert (await scripts.finish(new_run, "succeeded", '"new"')).get("cached") is True
    late = await scripts.finish(old_run, "succeeded", '"old"')
    assert (late.o, late.get("cached"), late.get("superseded_by")) == ("succeeded", False, new)
    assert (await scripts.result())["value"] == '"new"'
    assert "result not cached: superseded by " + new in await scripts.history(old)


async def test_a_cancelled_job_refuses_its_result_and_records_the_stop(scripts: Scripts) -> None:
    job = await scripts.enqueue()
    run = run_of(await scripts.claim(job), job)
    await scripts.cancel(job)
    late = await scripts.finish(run, "succeeded", '"late"')
    assert (late.o, late.state, late.get("refused")) == ("stopped", "cancelled", True)
    assert late.get("cancel_requested")
    assert await scripts.result() == {}
    assert (await scripts.job(job))["state"] == "cancelled"
    assert (await scripts.history(job))[-1] == "result refused: the job was cancelled"
    # The normal path: the worker saw the cancellation and stopped the handler.
    job2 = await scripts.enqueue("q")
    run2 = run_of(await scripts.claim(job2), job2)
    await scripts.cancel(job2)
    stopped = await scripts.finish(run2, "stopped", prefix="q")
    assert (stopped.o, stopped.get("refused")) == ("stopped", None)
    assert (await scripts.history(job2))[-1] == "stopped by worker"
    assert "owner" not in await scripts.job(job2)


async def test_failures_retry_until_max_attempts(scripts: Scripts) -> None:
    job = await scripts.enqueue()
    for attempt in (1, 2):
        facts = await scripts.claim(job, max_attempts=3)
        assert facts.get("attempt") == attempt
        retry = await scripts.finish(run_of(facts, job), "failed", f"e{attempt}", max_attempts=3)
        # `gen` counts the retries; the re-published message carries it for reading only.
        assert (retry.o, retry.state, retry.get("gen")) == ("retry", "pending", attempt)
        record = await scripts.job(job)
        assert (record["state"], record["error"], record["attempt"]) == (
            "pending",
            f"e{attempt}",
            str(attempt),
        )
    facts = await scripts.claim(job, max_attempts=3)
    final = await scripts.finish(run_of(facts, job), "failed", "e3", max_attempts=3)
    assert (final.o, final.state, final.get("attempt")) == ("failed", "failed", 3)
    assert (await scripts.claim(job, max_attempts=3)).get("reason") == "failed"


async def test_release_gives_the_job_back_without_counting_an_attempt(scripts: Scripts) -> None:
    job = await scripts.enqueue()
    run = run_of(await scripts.claim(job), job)
    released = await scripts.ws.release(run, now(), "released: worker stopping")
    assert (released.o, released.state) == ("released", "pending")
    record = await scripts.job(job)
    assert (record["state"], record["attempt"]) == ("pending", "0")
    assert "owner" not in record
    again = await scripts.claim(job, "w2")
    assert (again.o, again.get("attempt"), again.get("claim")) == ("claimed", 1, 2)
    assert (await scripts.ws.release(run, now(), "x")).o == "refused"  # the old run


async def test_a_superseded_running_job_released_is_cancelled(scripts: Scripts) -> None:
    job = await scripts.enqueue()
    run = run_of(await scripts.claim(job), job)
    await scripts.enqueue()
    released = await scripts.ws.release(run, now(), "released: worker stopping")
    assert (released.o, released.state) == ("cancelled", "cancelled")


# -- property: whatever the interleaving, only the scope's current job is ever cached ----------


async def _progress(s: Scripts, job: str, run: Run) -> None:
    """progress.lua stores exactly when the run holds a running job that was not superseded."""
    record = await s.job(job)
    holds = (record.get("owner"), record.get("claim")) == (run.owner, str(run.claim))
    expected = record["state"] == "running" and holds and "superseded_by" not in record
    sent = {"fraction": 0.5, "message": uuid.uuid4().hex, "at": now()}
    facts = await s.ws.progress(run, sent)
    event(f"progress {facts.o}")
    assert facts.o == ("stored" if expected else "refused"), (facts.raw, record)
    stored = (await s.job(job)).get("progress")
    if expected:
        assert stored is not None
        assert orjson.loads(stored) == sent
    else:
        assert stored == record.get("progress"), "a refused progress writes nothing"


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("manage"), st.booleans()),
        st.tuples(st.just("claim"), st.just(0), st.sampled_from([0, LONG])),
        st.tuples(st.just("claim"), st.integers(0, 2), st.sampled_from([0, LONG])),
        st.tuples(st.just("finish"), st.integers(0, 2), st.sampled_from(["succeeded", "failed"])),
        st.tuples(st.just("cancel"), st.integers(0, 2)),
        st.tuples(st.just("release"), st.integers(0, 2)),
        st.tuples(st.just("progress"), st.integers(0, 2)),
    ),
    min_size=1,
    max_size=20,
)
FINAL = ("succeeded", "failed", "cancelled")


@hsettings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_any_interleaving_keeps_the_invariants(
    settings: Settings, module_redis: RedisServer, ops: list[tuple]
) -> None:
    if not settings.redis_cluster:  # the cluster module runs it on its own cluster
        settings = settings.model_copy(update={"redis_url": module_redis.url})
    asyncio.run(_interleave(settings, ops))


async def _interleave(settings: Settings, ops: list[tuple]) -> None:  # noqa: C901 a dispatcher of steps
    namespace = f"jlmp{uuid.uuid4().hex[:10]}"
    metrics = Metrics()
    keys = Keys(namespace)
    store = Store(_connect(settings), keys, metrics)
    redis = _connect(settings)
    s = Scripts(
        WorkerStore(
            store, settings.file.job_ttl, settings.file.terminal_ttl, settings.file.max_history_jobs
        ),
        Lifecycle(store, settings, metrics),
        redis,
        keys,
    )
    jobs: list[str] = []
    runs: dict[str, Run] = {}  # the last run claimed per job
    claims: dict[str, int] = {}
    finals: dict[str, str] = {}
    try:
        for op in ops:
            kind = op[0]
            if kind == "manage":
                jobs.append(await s.enqueue(cancel_running=op[1]))
                continue
            if not jobs:
                continue
            job = jobs[-1 - op[1] % len(jobs)]  # mostly the newest jobs: they can still run
            before = (await s.job(job))["state"]
            if kind == "claim":
                facts = await s.claim(job, f"w{len(runs)}", lease_ms=op[2], max_attempts=2)
                event(f"claim {facts.o} {facts.get('reason') or ''} {facts.get('recovered')}")
                if facts.o == "claimed":
                    assert before == "pending" or (before == "running" and facts.get("recovered"))
                    claims[job] = claims.get(job, 0) + 1
                    runs[job] = run_of(facts, job, f"w{len(runs)}")
            elif kind == "finish" and job in runs:
                done = await s.finish(runs[job], op[2], '"v"', max_attempts=2)
                event(f"finish {done.o} cached={done.get('cached')}")
            elif kind == "cancel":
                await s.cancel(job)
            elif kind == "progress" and job in runs:
                await _progress(s, job, runs[job])
            elif kind == "release" and job in runs:
                released = await s.ws.release(runs[job], now(), "r")
                if released.o == "released":
                    claims[job] -= 1
            # Invariants after every step.
            current = (
                await s.redis.hget(keys.scope(scope_tag("p", T), "p", T), "job") or b""
            ).decode()
            cached = await s.result()
            if cached:
                assert cached["job"] == current, "only the scope's current job is ever cached"
                assert (await s.job(current))["state"] == "succeeded"
            for j in jobs:
                state = (await s.job(j))["state"]
                if j in finals:
                    assert state == finals[j], "a final state never changes"
                elif state in FINAL:
                    finals[j] = state
                assert claims.get(j, 0) <= 2, "no more runs than max_attempts"
                ttl = await s.redis.ttl(keys.job(j))
                if state in FINAL:
                    assert 0 < ttl <= settings.file.terminal_ttl, "a final job is kept terminal_ttl"
                else:
                    assert ttl > settings.file.terminal_ttl, "a live job is kept job_ttl"
                if j != jobs[-1]:
                    assert state != "pending", "a superseded job never waits to run"
    finally:
        await delete_namespace(redis, namespace)
        await redis.aclose()
        await store.close()
