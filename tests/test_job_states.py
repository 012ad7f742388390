"""The job state machine with scheduled jobs: random sequences of `manage` (every policy, with and
without debounce and not_before), `cancel` and scheduler sweeps, run through `Lifecycle` and the
scheduler's scripts on the real Redis. After every step: each job's history moves only as
`jlm.states` allows, every scheduled job has a due entry (none lost), and a scope has at most one
live job."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from tests.support.redis_server import RedisServer
from tests.support.services import delete_namespace

from jlm.config import Settings
from jlm.due import DueSets
from jlm.keys import DUE_SLOTS, Keys
from jlm.lifecycle import Context, Lifecycle
from jlm.metrics import Metrics
from jlm.protocol import parse_request
from jlm.states import LIVE, TERMINAL, allowed
from jlm.store import Store, connect

pytestmark = pytest.mark.timeout(300)
T = "states"
PAST, FUTURE = "2020-01-01T00:00:00Z", "2999-01-01T00:00:00Z"

MANAGE = st.tuples(
    st.just("manage"),
    st.integers(0, 1),  # scope
    st.sampled_from(["replace", "skip", "reuse", "debounce"]),
    st.sampled_from([None, PAST, FUTURE]),  # not_before
)
CANCEL = st.tuples(st.just("cancel"), st.integers(0, 20), st.just(""), st.just(None))
SWEEP = st.tuples(st.just("sweep"), st.just(0), st.just(""), st.just(None))
STEPS = st.lists(st.one_of(MANAGE, CANCEL, SWEEP), min_size=1, max_size=25)


def test_no_terminal_state_has_a_way_out() -> None:
    for state in TERMINAL:
        assert not any(allowed(state, after) for after in (*LIVE, *TERMINAL))


# `settings` is only read; each example makes its own namespace and clients on the module's Redis.
@hsettings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(STEPS)
def test_random_steps_keep_the_state_machine(
    settings: Settings, module_redis: RedisServer, steps: list[tuple[str, int, str, str | None]]
) -> None:
    asyncio.run(_run(settings.model_copy(update={"redis_url": module_redis.url}), steps))


async def _run(settings: Settings, steps: list[tuple[str, int, str, str | None]]) -> None:
    keys = Keys(f"jlmp{uuid.uuid4().hex[:10]}")
    metrics = Metrics(process=False)
    store = Store(connect(settings.redis_url), keys, metrics)
    lifecycle = Lifecycle(store, settings, metrics)
    due = DueSets(store, 3600)
    redis = aioredis.Redis.from_url(settings.redis_url)
    jobs: list[str] = []
    try:
        for op, n, policy, not_before in steps:
            if op == "manage":
                await _manage(lifecycle, jobs, n, policy, not_before)
            elif op == "cancel" and jobs:
                ctx = Context(request_id=uuid.uuid4().hex, idempotent=False, actor=None)
                body = orjson.dumps({"job_id": jobs[n % len(jobs)]})
                await lifecycle.handle("cancel", parse_request("cancel", body, 1 << 20), ctx)
            elif op == "sweep":
                await _sweep(due, redis, keys)
            await _check(redis, keys, jobs)
    finally:
        await delete_namespace(redis, keys.namespace)
        await redis.aclose()
        await store.close()


async def _manage(
    lifecycle: Lifecycle, jobs: list[str], scope: int, policy: str, not_before: str | None
) -> None:
    body: dict[str, Any] = {"job_type": T, "cache_prefix": f"s{scope}", "payload": {}}
    body["policy"] = policy
    if policy == "debounce":
        body["debounce_ms"] = 1
    if not_before is not None:
        body["not_before"] = not_before
    request = parse_request("manage", orjson.dumps(body), 1 << 20)
    ctx = Context(request_id=uuid.uuid4().hex, idempotent=False, actor=None)
    out = await lifecycle.handle("manage", request, ctx)
    job_id = out.reply["new_job_id"]
    if job_id not in jobs:
        jobs.append(job_id)


async def _sweep(due: DueSets, redis: aioredis.Redis, keys: Keys) -> None:
    """A scheduler's pass: every due entry taken, promoted, and settled (nothing is published)."""
    await asyncio.sleep(0.005)  # a 1 ms debounce window has passed
    for slot in range(DUE_SLOTS):
        taken = await due.take(slot, 1000, 10_000)
        settled: list[tuple[str, int | None]] = []
        for job_id in taken:
            before = (await redis.hget(keys.job(job_id), "state") or b"").decode()
            p = await due.promote(job_id, 10_000)
            if p.verdict == "publish":
                assert before == "scheduled", f"{job_id} published from {before}"
            settled.append((job_id, p.due_ms if p.verdict == "later" else None))
        await due.settle(slot, settled)


async def _check(redis: aioredis.Redis, keys: Keys, jobs: list[str]) -> None:
    entries: set[str] = set()
    for slot in range(DUE_SLOTS):
        entries |= {m.decode() for m in await redis.zrange(keys.due(slot), 0, -1)}
        entries |= {m.decode() for m in await redis.zrange(keys.due_taken(slot), 0, -1)}
    live_by_scope: dict[str, list[str]] = {}
    for job_id in jobs:
        job = {k.decode(): v.decode() for k, v in (await redis.hgetall(keys.job(job_id))).items()}
        history = [
            orjson.loads(h)["state"] for h in await redis.lrange(keys.history(job_id), 0, -1)
        ]
        moves = list(zip([None, *history], history, strict=False))
        assert all(allowed(a, b) for a, b in moves), f"{job_id}: {history}"
        assert history[-1] == job["state"]
        if job["state"] == "scheduled":
            assert job_id in entries, f"scheduled job {job_id} has no due entry"
        if job["state"] in LIVE:
            live_by_scope.setdefault(job["cache_prefix"], []).append(job_id)
    assert all(len(v) == 1 for v in live_by_scope.values()), live_by_scope
