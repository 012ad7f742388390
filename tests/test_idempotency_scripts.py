"""Idempotency and ordering of the recording scripts, called through `Lifecycle` on the real Redis.

The delivery is modelled, not run: a "delivery" is one call of the lifecycle with the request's
digest and, for a redelivered message, the broker session that got it; "publishing" is appending
the outcome's job and events to lists. A killed daemon is a delivery whose outcome is thrown away
(decided in Redis, nothing published, never acked: the broker redelivers it).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from tests.support.redis_server import RedisServer

import jlm.keys
from jlm.config import Settings
from jlm.errors import IdempotencyConflict
from jlm.keys import Keys, scope_tag
from jlm.lifecycle import Context, Lifecycle, Outcome
from jlm.metrics import Metrics
from jlm.protocol import parse_request, request_digest
from jlm.store import Store, connect

pytestmark = pytest.mark.timeout(120)
T = "idem"
MAX_BYTES = 2 * 1024 * 1024


@dataclass
class Published:
    """What reached the broker: job ids in the job queue, provenance ids of events."""

    jobs: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)


@dataclass
class Harness:
    lifecycle: Lifecycle
    keys: Keys
    redis: aioredis.Redis
    published: Published = field(default_factory=Published)

    async def deliver(
        self,
        op: str,
        body: dict[str, Any] | bytes,
        message_id: str | None = "m-1",
        *,
        actor: str | None = None,
        session: str = "",
        killed: bool = False,
    ) -> Outcome:
        """One delivery of a request: decided, then (unless killed) published and marked.

        `session` names the broker session of a redelivered message ("" for a first delivery)."""
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        request = parse_request(op, raw, MAX_BYTES)
        ctx = Context(
            request_id=message_id or uuid.uuid4().hex,
            idempotent=message_id is not None,
            actor=actor,
            digest=request_digest(op, actor, raw) if message_id else "",
            redelivered_in=session,
        )
        out = await self.lifecycle.handle(op, request, ctx)
        if killed:
            return out
        if out.job is not None:
            self.published.jobs.append(out.job.job_id)
        self.published.events += [e.provenance_id for e in out.events]
        self.lifecycle.published(out)
        await self.lifecycle._store.flush_marks()  # as the daemon does a moment later
        return out

    async def job(self, job_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self.keys.job(job_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def scope(self, prefix: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self.keys.scope(scope_tag(prefix, T), prefix, T))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def job_hashes(self) -> dict[str, dict[str, str]]:
        out = {}
        async for key in self.redis.scan_iter(match=f"{self.keys.namespace}:{{*}}:job:*"):
            if not key.endswith(b":h"):
                job_id = key.decode().rsplit(":job:", 1)[1]
                out[job_id] = await self.job(job_id)
        return out


async def _harness(settings: Settings, namespace: str, redis: aioredis.Redis) -> Harness:
    metrics = Metrics()
    keys = Keys(namespace)
    store = Store(connect(settings.redis_url), keys, metrics)
    return Harness(Lifecycle(store, settings, metrics), keys, redis)


@pytest.fixture(params=["one-redis", "cluster-binding"])
async def h(
    request: pytest.FixtureRequest, settings: Settings, namespace: str, redis_client: aioredis.Redis
) -> AsyncIterator[Harness]:
    """On one Redis the script binds the key; with JLM_REDIS_CLUSTER the binding is its own call
    (run here against one Redis, which accepts both ways)."""
    if request.param == "cluster-binding":
        settings = settings.model_copy(update={"redis_cluster": True})
    harness = await _harness(settings, namespace, redis_client)
    yield harness
    await harness.lifecycle._store.close()


def manage(prefix: str = "p", **extra: Any) -> dict[str, Any]:
    return {"job_type": T, "payload": {"n": 1}, "cache_prefix": prefix, **extra}


# -- the digest -----------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.mark.unit
@given(st.dictionaries(st.text(max_size=6), JSON, max_size=6), st.randoms(use_true_random=False))
def test_equal_parsed_json_has_an_equal_digest(body: dict[str, Any], rnd: Any) -> None:
    def shuffled(value: Any) -> Any:
        if isinstance(value, dict):
            items = list(value.items())
            rnd.shuffle(items)
            return {k: shuffled(v) for k, v in items}
        if isinstance(value, list):
            return [shuffled(v) for v in value]
        return value

    compact = orjson.dumps(body)
    spaced = orjson.dumps(shuffled(body), option=orjson.OPT_INDENT_2)
    assert request_digest("manage", "a", compact) == request_digest("manage", "a", spaced)
    assert request_digest("manage", "a", compact) != request_digest("cancel", "a", compact)
    assert request_digest("manage", "a", compact) != request_digest("manage", "b", compact)
    assert request_digest("manage", None, compact) != request_digest("manage", "", compact)
    other = {**body, "\x00other": 1}
    assert request_digest("manage", "a", compact) != request_digest(
        "manage", "a", orjson.dumps(other)
    )


# -- replays and conflicts ------------------------------------------------------------------------


async def test_a_replay_answers_equal_and_publishes_nothing(h: Harness) -> None:
    first = await h.deliver("manage", manage())
    # The same body with another key order and white space is the same request.
    again = await h.deliver(
        "manage", b'{ "cache_prefix": "p", "payload": {"n": 1}, "job_type": "idem" }'
    )
    assert again.replayed
    assert again.reply == first.reply
    assert again.job is None
    assert again.events == []
    assert h.published.jobs == [first.reply["new_job_id"]]
    assert len(h.published.events) == 1
    assert len(await h.job_hashes()) == 1


async def test_another_request_under_a_key_is_a_conflict_that_changes_nothing(h: Harness) -> None:
    first = await h.deliver("manage", manage())
    job = first.reply["new_job_id"]
    before = (await h.scope("p"), await h.job(job))
    for op, body in (
        ("manage", manage(payload={"n": 2})),  # another body
        ("manage", manage(priority=9)),  # another field
        ("manage", manage("q")),  # another scope, even one never used
        ("cancel", {"job_id": job}),  # another operation
        ("invalidate", {"job_type": T, "cache_prefix": "p"}),
    ):
        with pytest.raises(IdempotencyConflict):
            await h.deliver(op, body)
    assert (await h.scope("p"), await h.job(job)) == before
    assert await h.scope("q") == {}
    assert len(await h.job_hashes()) == 1
    assert h.published.jobs == [job]
    # Another actor's key is its own: an independent decision.
    other = await h.deliver("manage", manage(), actor="mallory")
    assert not other.replayed
    assert other.reply["new_job_id"] != job
    assert other.reply["previous_job_id"] == job  # same scope, so it supersedes as any request does


async def test_cancel_and_invalidate_are_bound_and_replayed(h: Harness) -> None:
    j1 = (await h.deliver("manage", manage(), "m-j1")).reply["new_job_id"]
    j2 = (await h.deliver("manage", manage("q"), "m-j2")).reply["new_job_id"]
    cancel = await h.deliver("cancel", {"job_id": j1}, "c-1")
    assert cancel.reply["cancelled"] is True
    # The same id naming another job: refused, J2 stays pending.
    with pytest.raises(IdempotencyConflict):
        await h.deliver("cancel", {"job_id": j2}, "c-1")
    assert (await h.job(j2))["state"] == "pending"
    replay = await h.deliver("cancel", {"job_id": j1}, "c-1")
    assert replay.replayed
    assert replay.reply == cancel.reply
    assert replay.events == []
    # An invalidate reusing a manage's id is refused; the cache is not touched.
    result_key = h.keys.result(scope_tag("q", T), "q", T)
    await h.redis.hset(result_key, mapping={"job": j2, "value": b"1", "at": "t"})
    with pytest.raises(IdempotencyConflict):
        await h.deliver("invalidate", {"job_type": T, "cache_prefix": "q"}, "m-j2")
    assert await h.redis.exists(result_key)
    inv = await h.deliver("invalidate", {"job_type": T, "cache_prefix": "q"}, "i-1")
    assert inv.reply["cache_invalidated"] is True
    again = await h.deliver("invalidate", {"job_type": T, "cache_prefix": "q"}, "i-1")
    assert again.replayed
    assert again.reply == inv.reply
    assert again.events == []


async def test_a_redelivery_republishes_the_recorded_job_once(h: Harness) -> None:
    decided = await h.deliver("manage", manage(priority=7), killed=True)
    job = decided.reply["new_job_id"]
    assert h.published.jobs == []
    # A publisher's retry (a new delivery) publishes nothing: the first delivery is still unacked.
    retry = await h.deliver("manage", manage(priority=7))
    assert retry.reply == decided.reply
    assert retry.job is None
    assert retry.events == []
    # The redelivery publishes the decided job and events, rebuilt from the record.
    again = await h.deliver("manage", manage(priority=7), session="s1")
    assert again.reply == decided.reply
    assert again.job is not None
    assert decided.job is not None
    assert again.job == decided.job  # job id, payload, priority, enqueued_at as decided
    assert [e.body() for e in again.events] == [e.body() for e in decided.events]
    # Once that is confirmed and marked, a further redelivery (e.g. the retry, redelivered after
    # its own daemon died) publishes nothing.
    last = await h.deliver("manage", manage(priority=7), session="s2")
    assert last.job is None
    assert last.events == []
    assert h.published.jobs == [job]


async def test_one_session_republishes_once_and_a_dead_one_does_not_count(h: Harness) -> None:
    decided = await h.deliver("manage", manage(), killed=True)
    retry = await h.deliver("manage", manage(), killed=True)  # the same daemon held a retry too
    # A session that takes both dies before publishing: the next one publishes, once.
    await h.deliver("manage", manage(), session="s1", killed=True)
    await h.deliver("manage", manage(), session="s1", killed=True)
    first = await h.deliver("manage", manage(), session="s2")
    second = await h.deliver("manage", manage(), session="s2")
    assert first.job == decided.job
    assert second.job is None
    assert second.events == []
    assert first.reply == second.reply == retry.reply == decided.reply
    assert h.published.jobs == [decided.reply["new_job_id"]]


async def test_a_redelivery_does_not_republish_a_job_that_moved_on(h: Harness) -> None:
    first = await h.deliver("manage", manage(), "m-1", killed=True)
    await h.deliver("manage", manage(payload={"n": 2}), "m-2")  # supersedes the pending job
    again = await h.deliver("manage", manage(), "m-1", session="s1")
    assert again.reply == first.reply
    assert again.job is None  # cancelled: it would never run
    assert [e.provenance_id for e in again.events] == [e.provenance_id for e in first.events]


async def test_a_reuse_replay_reads_the_result_again(h: Harness) -> None:
    job = (await h.deliver("manage", manage(), "m-0")).reply["new_job_id"]
    result_key = h.keys.result(scope_tag("p", T), "p", T)
    value = orjson.dumps({"pages": "x" * 5000})
    await h.redis.hset(result_key, mapping={"job": job, "value": value, "at": "t"})
    hit = await h.deliver("manage", manage(policy="reuse"), "m-1")
    assert hit.reply["result"] == {"pages": "x" * 5000}
    record = h.keys.request(scope_tag("p", T), None, "m-1")
    assert await h.redis.hstrlen(record, "f") < 400  # a reference, not a copy
    again = await h.deliver("manage", manage(policy="reuse"), "m-1")
    assert again.reply == hit.reply
    # Once the result is gone, the replay answers the same reply with result null.
    await h.redis.delete(result_key)
    gone = await h.deliver("manage", manage(policy="reuse"), "m-1")
    assert gone.reply == {**hit.reply, "result": None}


async def test_status_and_result_keep_no_record(h: Harness) -> None:
    job = (await h.deliver("manage", manage(), "m-1")).reply["new_job_id"]
    keys_before = {k async for k in h.redis.scan_iter(match=f"{h.keys.namespace}:*")}
    first = await h.deliver("status", {"job_id": job}, "s-1")
    await h.deliver("cancel", {"job_id": job}, "c-1")
    second = await h.deliver("status", {"job_id": job}, "s-1")
    assert (first.reply["state"], second.reply["state"]) == ("pending", "cancelled")
    await h.deliver("result", {"job_type": T, "cache_prefix": "p"}, "s-1")
    keys_after = {k async for k in h.redis.scan_iter(match=f"{h.keys.namespace}:*")}
    assert not {k for k in keys_after - keys_before if b":s-1:" in k}


async def test_scopes_forced_onto_one_tag_never_read_each_other(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jlm.keys, "TAG_BITS", 0)
    assert scope_tag("victim", T) == scope_tag("attacker", T)
    victim = await h.deliver("manage", manage("victim"), "m-1", actor="alice")
    # The attacker's own key: an independent decision in its own scope, nothing of the victim's.
    mine = await h.deliver("manage", manage("attacker"), "m-1", actor="mallory")
    assert not mine.replayed
    assert mine.reply["new_job_id"] != victim.reply["new_job_id"]
    assert mine.reply["previous_job_id"] is None
    # No actor at all is an actor of its own too.
    anon = await h.deliver("manage", manage("attacker"), "m-1", actor=None)
    assert not anon.replayed
    assert anon.reply["new_job_id"] not in {
        victim.reply["new_job_id"],
        mine.reply["new_job_id"],
    }
    # The victim's own key on the other scope: refused, not replayed.
    with pytest.raises(IdempotencyConflict):
        await h.deliver("manage", manage("attacker"), "m-1", actor="alice")
    assert (await h.job(victim.reply["new_job_id"]))["state"] == "pending"


# -- ordering without requested_at ----------------------------------------------------------------


async def test_a_request_without_requested_at_is_stamped_by_redis_and_never_stale(
    h: Harness,
) -> None:
    future = "2099-01-01T00:00:00.000Z"
    first = await h.deliver("manage", manage(requested_at=future), None)
    # Newer than nothing the publisher says, yet never stale: it supersedes.
    unstamped = await h.deliver("manage", manage(), None)
    assert unstamped.reply["deduplicated"] is False
    assert unstamped.reply["previous_job_id"] == first.reply["new_job_id"]
    (seconds, micros) = await h.redis.time()
    now_us = seconds * 1_000_000 + micros
    at = int((await h.scope("p"))["at"])
    assert now_us - 5_000_000 < at <= now_us  # the server's clock, to the µs
    job = await h.job(unstamped.reply["new_job_id"])
    assert job["requested_at"] == str(at)
    # A publisher-stamped request older than that stamp is stale; a newer one is not.
    old = await h.deliver("manage", manage(requested_at="2020-01-01T00:00:00.000Z"), None)
    assert old.reply["deduplicated"] is True
    assert old.reply["new_job_id"] == unstamped.reply["new_job_id"]
    assert old.job is None
    new = await h.deliver("manage", manage(requested_at=future), None)
    assert new.reply["deduplicated"] is False


# -- memory of reuse hits -------------------------------------------------------------------------


async def test_reuse_hits_add_memory_independent_of_the_result_size(
    settings: Settings, tmp_path: Path
) -> None:
    """1,000 hits with new message_ids on a 1 MiB result, on a Redis of the test's own."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        own = settings.model_copy(update={"redis_url": server.url})
        redis = aioredis.Redis.from_url(server.url)
        harness = await _harness(own, "mem", redis)
        job = (await harness.deliver("manage", manage(), "m-0")).reply["new_job_id"]
        value = orjson.dumps("r" * (1024 * 1024))
        await redis.hset(
            harness.keys.result(scope_tag("p", T), "p", T),
            mapping={"job": job, "value": value, "at": "t"},
        )
        hit = await harness.deliver("manage", manage(policy="reuse"), "warm-up")
        assert hit.reply["result"] == "r" * (1024 * 1024)
        await asyncio.sleep(3)  # Redis shrinks the 1 MiB query and reply buffers of idle clients
        before = int((await redis.info("memory"))["used_memory"])
        for i in range(1000):
            out = await harness.deliver("manage", manage(policy="reuse"), f"hit-{i}")
            assert out.reply["new_job_id"] == job
            assert out.reply["deduplicated"] is True
        await asyncio.sleep(3)
        grown = int((await redis.info("memory"))["used_memory"]) - before
        keys = [k async for k in redis.scan_iter(match="mem:*hit-*")]
        assert len(keys) == 2000  # a record and a binding per hit
        held = sum([await redis.memory_usage(k) or 0 for k in keys])
        print(
            f"1000 reuse hits of a 1 MiB result: used_memory grew by {grown} bytes; "
            f"their records and bindings hold {held} bytes"
        )
        assert grown < 2 * 1024 * 1024
        assert held < 2 * 1024 * 1024
        await harness.lifecycle._store.close()
        await redis.aclose()
    finally:
        server.stop()


# -- interleavings --------------------------------------------------------------------------------

# (kind, message index): publish (first delivery), retry (a publisher's re-publish, same body),
# other (same id, another body), crash (a delivery decided by a daemon killed before it published),
# redeliver (a new session gets every delivery killed daemons held), redeliver-crash (the same, and
# that session's daemon is killed too before it published anything).
STEP = st.tuples(
    st.sampled_from(["publish", "retry", "other", "crash", "redeliver", "redeliver-crash"]),
    st.integers(0, 5),
)


@hsettings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(STEP, min_size=1, max_size=30), cluster=st.booleans())
def test_any_interleaving_decides_once_and_publishes_once(
    settings: Settings, module_redis: RedisServer, steps: list[tuple[str, int]], cluster: bool
) -> None:
    update = {"redis_cluster": cluster, "redis_url": module_redis.url}
    asyncio.run(_interleave(settings.model_copy(update=update), steps))


def _body(i: int, other: bool = False) -> dict[str, Any]:
    policy = ("replace", "skip", "reuse")[i % 3]
    return manage(f"s{i % 2}", payload={"i": i, "other": other}, policy=policy)


async def _interleave(settings: Settings, steps: list[tuple[str, int]]) -> None:  # noqa: C901 a dispatcher of steps
    namespace = f"jlmp{uuid.uuid4().hex[:10]}"
    redis = aioredis.Redis.from_url(settings.redis_url)
    h = await _harness(settings, namespace, redis)
    replies: dict[int, list[dict[str, Any]]] = {}
    unacked: dict[int, int] = {}  # message -> deliveries a killed daemon held, never acked
    decided: dict[int, Outcome] = {}
    try:

        async def deliver(i: int, *, session: str = "", killed: bool = False) -> None:
            out = await h.deliver("manage", _body(i), f"m{i}", session=session, killed=killed)
            if out.replayed:
                assert i in decided, "a replay of nothing"
            else:
                assert i not in decided, f"m{i} decided twice"
                decided[i] = out
            replies.setdefault(i, []).append(out.reply)
            if killed:
                unacked[i] = unacked.get(i, 0) + 1

        async def redeliver(*, killed: bool) -> None:
            held = sorted(unacked.items())
            unacked.clear()
            session = uuid.uuid4().hex
            for j, n in held:
                for _ in range(n):
                    await deliver(j, session=session, killed=killed)

        for kind, i in steps:
            if kind in {"publish", "retry"}:
                await deliver(i)
            elif kind == "crash":
                await deliver(i, killed=True)
            elif kind.startswith("redeliver"):
                await redeliver(killed=kind == "redeliver-crash")
            elif i in decided:
                with pytest.raises(IdempotencyConflict):
                    await h.deliver("manage", _body(i, other=True), f"m{i}")
        # All settle: the broker redelivers what killed daemons held.
        await redeliver(killed=False)

        for i, answers in replies.items():
            assert all(a == answers[0] for a in answers), f"m{i} answered differently"
        counts = {job: h.published.jobs.count(job) for job in h.published.jobs}
        assert all(n == 1 for n in counts.values()), f"a second job message: {counts}"
        by_request: dict[str, int] = {}
        for job_id, job in (await h.job_hashes()).items():
            by_request[job["request_id"]] = by_request.get(job["request_id"], 0) + 1
            if job["state"] == "pending":
                assert job_id in counts, "a pending job whose message was never published"
        assert all(n == 1 for n in by_request.values()), by_request
        # Each decision's events reached the broker exactly once.
        expected = [e.provenance_id for out in decided.values() for e in out.events]
        assert sorted(h.published.events) == sorted(expected)
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{namespace}:*", count=1000)]
        if keys:
            await redis.delete(*keys)
        await h.lifecycle._store.close()
        await redis.aclose()
