"""The worker SDK against a 3-master Redis Cluster: a daemon and real `jlm worker` processes,
both with JLM_REDIS_CLUSTER=true and JLM_REDIS_URL naming the cluster's first node.

The worker scripts' tests of tests/test_worker_scripts.py run again here, on the cluster (this
module's `make_settings` and `redis_client` point them at it). Then, end to end: jobs over scopes
on every master each run once and their results are read back through the daemon, across a
SCRIPT FLUSH of every node; superseded jobs on every master never run; a running job on any
master is stopped within 2 s by the cancel pushed on pub/sub (published by the master holding the
job, received by the worker subscribed on another node); and when the node the worker is
subscribed on dies, the worker subscribes on another node and the push still stops a job.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster
from tests.support.redis_server import RedisClusterServers
from tests.support.services import RunningDaemon, settings_factory, start_daemon
from tests.test_worker import JOB_TYPE, Env, WorkerProcess, until

# The worker scripts' tests, collected again in this module under its cluster fixtures.
from tests.test_worker_scripts import (  # noqa: F401
    scripts,
    test_a_cancelled_job_refuses_its_result_and_records_the_stop,
    test_a_superseded_job_cannot_overwrite_its_successors_result,
    test_a_superseded_running_job_of_a_lost_worker_is_not_run_again,
    test_a_superseded_running_job_released_is_cancelled,
    test_an_expired_lease_means_a_lost_worker,
    test_any_interleaving_keeps_the_invariants,
    test_claim_skips_what_must_not_run,
    test_claim_takes_a_pending_job_once,
    test_failures_retry_until_max_attempts,
    test_finish_caches_a_result_with_its_state_and_ttl,
    test_heartbeat_renews_only_its_own_run_and_reports_a_cancellation,
    test_release_gives_the_job_back_without_counting_an_attempt,
)

from jlm.client import Client
from jlm.config import Settings
from jlm.keys import Keys, scope_tag

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

# Long enough that no heartbeat (every lease / 3) falls inside a test: a stop seen within 2 s
# was pushed on pub/sub.
PUSH_ONLY = {"JLM_LEASE_SECONDS": "60"}


@pytest.fixture
def make_settings(cluster_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    return cluster_settings


@pytest.fixture
def redis_client(cluster_redis: RedisCluster) -> RedisCluster:
    return cluster_redis


@pytest.fixture
def env(  # noqa: PLR0917 - fixtures arrive as parameters
    daemon: RunningDaemon,
    client: Client,
    settings: Settings,
    cluster_redis: RedisCluster,
    namespace: str,
    tmp_path: Path,
) -> Env:
    return Env(daemon, client, settings, cluster_redis, namespace, tmp_path)


class Masters:
    """Which master (index in `RedisClusterServers.nodes`) holds a scope's or a job's keys."""

    def __init__(self, client: RedisCluster, cluster: RedisClusterServers, namespace: str) -> None:
        self._client = client
        self._ports = [node.port for node in cluster.nodes]
        self._keys = Keys(namespace)

    async def load(self) -> Masters:
        await self._client.initialize()
        return self

    def of_key(self, key: str) -> int:
        return self._ports.index(int(self._client.get_node_from_key(key).port))

    def of_job(self, job_id: str) -> int:
        return self.of_key(self._keys.job(job_id))

    def of_scope(self, prefix: str) -> int:
        tag = scope_tag(prefix, JOB_TYPE)
        return self.of_key(self._keys.scope(tag, prefix, JOB_TYPE))

    def one_scope_each(self, stem: str) -> list[str]:
        """A cache_prefix on each master, in the order of the nodes."""
        found: dict[int, str] = {}
        i = 0
        while len(found) < len(self._ports):
            prefix = f"{stem}{i}"
            found.setdefault(self.of_scope(prefix), prefix)
            i += 1
        return [found[m] for m in range(len(self._ports))]

    def message_id_on(self, master: int, stem: str) -> str:
        """A message_id (sent with no user_id) whose idempotency binding lives on `master`."""
        i = 0
        while self.of_key(self._keys.binding(None, f"{stem}{i}")) != master:
            i += 1
        return f"{stem}{i}"


@pytest.fixture
async def masters(
    cluster_redis: RedisCluster, cluster: RedisClusterServers, namespace: str
) -> Masters:
    return await Masters(cluster_redis, cluster, namespace).load()


def subscribers(cluster: RedisClusterServers, channel: str) -> list[int]:
    """PUBSUB NUMSUB of `channel` on each node: only that node's own subscribers."""
    counts = []
    for node in cluster.nodes:
        if node.proc is None or node.proc.poll() is not None:
            counts.append(-1)  # a killed node
            continue
        with node.client() as c:
            counts.append(int(dict(c.pubsub_numsub(channel))[channel.encode()]))
    return counts


def assert_clean_log(*procs: WorkerProcess) -> None:
    for p in procs:
        text = p.log_path.read_text(errors="replace")
        for bad in ("internal error", "Traceback", "CROSSSLOT", "MOVED"):
            assert bad not in text, f"{bad!r} in {p.log_path.name}: {p.tail()}"


# -- (a) many scopes over every master: each job runs once, its result is read back -------------


async def test_jobs_on_every_master_run_once_and_their_results_are_read(
    env: Env, masters: Masters, cluster: RedisClusterServers
) -> None:
    n = 300
    ids: dict[str, str] = {}  # cache_prefix -> job id
    async with env.workers("count", 2, concurrency=4) as procs:
        t0 = time.monotonic()
        for half in range(2):
            if half == 1:
                # Every script is gone from every node: daemon and workers load them again.
                for node in cluster.nodes:
                    with node.client() as c:
                        assert c.script_flush()
            prefixes = [f"m{i}" for i in range(half * n // 2, (half + 1) * n // 2)]
            batch = await asyncio.gather(
                *(env.submit(p, payload={"i": int(p[1:])}) for p in prefixes)
            )
            ids.update(zip(prefixes, batch, strict=True))
        assert len(set(ids.values())) == n

        async def all_ran() -> bool:
            return int(await env.redis.hlen(env.key("runs"))) >= n

        await until(all_ran, 90, f"{n} jobs to run")
        counted = await env.runs()
        assert set(counted) == set(ids.values())
        assert set(counted.values()) == {1}, "a job ran more than once"

        per_master = Counter(masters.of_job(job) for job in ids.values())
        assert sorted(per_master) == [0, 1, 2], per_master
        assert all(per_master[m] >= n // 10 for m in range(3)), per_master

        async def all_succeeded() -> bool:
            states = await asyncio.gather(*(env.status(j) for j in ids.values()))
            return all(s["state"] == "succeeded" for s in states)

        await until(all_succeeded, 20, "every job to be succeeded")
        for prefix, job in ids.items():
            result = await env.result(prefix)
            assert result["success"] is True, result
            assert result["cached"] is True, result
            assert result["job_id"] == job
            assert result["result"] == {"job": job, "echo": {"i": int(prefix[1:])}}
        claims = [p.metric("jlm_jobs_claimed_total", job_type=JOB_TYPE) for p in procs]
        assert sum(claims) == n
        assert all(c > 0 for c in claims), claims
        assert_clean_log(*procs)
        print(
            f"\n{n} jobs over {len(ids)} scopes, per master {dict(sorted(per_master.items()))}:"
            f" all run once in {time.monotonic() - t0:.1f}s; claims {claims}"
        )


# -- (b) a job superseded before it runs never executes, on any master -------------------------


async def test_superseded_jobs_on_every_master_never_run(env: Env, masters: Masters) -> None:
    prefixes = masters.one_scope_each("s")
    old, new = {}, {}
    for p in prefixes:
        old[p] = await env.submit(p, payload={"v": 1})
        new[p] = await env.submit(p, payload={"v": 2})
        assert await env.status_is(old[p], "cancelled")
    assert [masters.of_job(new[p]) for p in prefixes] == [0, 1, 2]
    async with env.workers("count") as (w,):
        for p in prefixes:
            await until(lambda p=p: env.status_is(new[p], "succeeded"), 20, f"the job of {p}")
        skipped = {"job_type": JOB_TYPE, "reason": "cancelled"}
        await until(lambda: w.metric("jlm_jobs_skipped_total", **skipped) >= 3, 5, "the skips")
        assert w.metric("jlm_jobs_skipped_total", **skipped) == 3
        assert await env.runs() == {new[p]: 1 for p in prefixes}
        for p in prefixes:
            assert await env.status_is(old[p], "cancelled")
            result = await env.result(p)
            assert (result["cached"], result["job_id"]) == (True, new[p])
            assert result["result"] == {"job": new[p], "echo": {"v": 2}}
        assert w.metric("jlm_jobs_claimed_total", job_type=JOB_TYPE) == 3
        assert_clean_log(w)


# -- (c) cancel of a running job on any master: pushed on pub/sub, stopped within 2 s ----------


async def test_cancel_of_running_jobs_on_every_master_stops_them_within_two_seconds(
    env: Env, masters: Masters, cluster: RedisClusterServers
) -> None:
    channel = Keys(env.namespace).cancel_channel
    prefixes = masters.one_scope_each("c")
    async with env.workers("sleepy", concurrency=3, **PUSH_ONLY) as (w,):
        # The worker listens on the node of JLM_REDIS_URL only; the other masters' PUBLISH
        # reaches it over the cluster bus.
        await until(lambda: subscribers(cluster, channel) == [1, 0, 0], 5, "the subscription")
        jobs = [await env.submit(p, payload={"seconds": 5}) for p in prefixes]
        assert [masters.of_job(j) for j in jobs] == [0, 1, 2]
        for job in jobs:
            await until(lambda job=job: env.started(job), 10, "the handler to start")
        last_start = time.monotonic()
        took = []
        for job in jobs:
            t0 = time.monotonic()
            reply = await env.client.call("cancel", {"job_id": job, "running": True})
            assert (reply["cancelled"], reply["state"]) == (True, "cancelled"), reply
            status = await until(
                lambda job=job: env.history_has(job, "stopped by worker"), 2, "the stop"
            )
            took.append(time.monotonic() - t0)
            assert status["state"] == "cancelled"
            assert not any("abandoned" in (h["reason"] or "") for h in status["history"])
            assert f"job {job} cancelled: stopping its handler" in w.tail(200)  # the push
        assert max(took) < 2.0, took
        # The handlers really stopped: no `done` marker, even after their sleep would have ended.
        await asyncio.sleep(max(0.0, 5.5 - (time.monotonic() - last_start)))
        for job in jobs:
            assert not await env.redis.exists(env.key(f"done:{job}"))
        assert await env.runs() == dict.fromkeys(jobs, 1)
        assert w.metric("jlm_jobs_finished_total", job_type=JOB_TYPE, state="cancelled") == 3
        assert w.metric("jlm_cancel_latency_seconds_count") == 3
        for p in prefixes:
            assert (await env.result(p))["cached"] is False
        assert_clean_log(w)
        print(f"\ncancel on masters 0/1/2: stopped after {'/'.join(f'{t:.2f}' for t in took)}s")


# -- (d) the node the worker listens on dies: it listens on another one ------------------------


async def test_the_cancel_channel_moves_to_another_node_when_its_node_dies(
    tmp_path: Path, vhost: str, namespace: str
) -> None:
    # Without full coverage the two other masters keep serving their slots once node 0 is gone.
    cluster = RedisClusterServers(
        tmp_path / "cluster", extra=("--cluster-require-full-coverage", "no")
    ).start()
    # The job type is configured: an unconfigured one is first admitted through the namespace's
    # job-type set, a key whose slot may be node 0's (dead below), and would wait for it.
    config = tmp_path / "jlm.toml"
    config.write_text(f'[job_types."{JOB_TYPE}"]\n')
    settings = settings_factory(
        vhost,
        namespace,
        JLM_REDIS_URL=cluster.url,
        JLM_REDIS_CLUSTER="true",
        JLM_CONFIG=str(config),
    )()
    channel = Keys(namespace).cancel_channel
    client = RedisCluster.from_url(cluster.url)
    daemon = await start_daemon(settings)
    worker: WorkerProcess | None = None
    try:
        masters = await Masters(client, cluster, namespace).load()
        async with Client(settings) as jlm:
            worker = WorkerProcess(
                settings, "tests.worker_handlers:nap", tmp_path / "worker.log", **PUSH_ONLY
            )
            await worker.ready()
            await until(lambda: subscribers(cluster, channel) == [1, 0, 0], 5, "the subscription")

            cluster.nodes[0].kill()
            t0 = time.monotonic()

            def moved() -> bool:
                counts = subscribers(cluster, channel)
                return counts[0] == -1 and sum(counts[1:]) == 1

            await until(moved, 10, "the worker to subscribe on another node")
            moved_in = time.monotonic() - t0
            assert "cancel channel: subscribed on redis://127.0.0.1:" in worker.tail(200)
            await worker.ready(5)

            # A scope, and idempotency keys (bound in slots of their own), on a surviving master.
            prefix = masters.one_scope_each("f")[1]
            reply = await jlm.call(
                "manage",
                {"job_type": JOB_TYPE, "cache_prefix": prefix, "payload": {"seconds": 30}},
                message_id=masters.message_id_on(1, "m"),
            )
            assert reply["success"] is True, reply
            job = str(reply["new_job_id"])

            async def running() -> bool:
                return bool((await jlm.call("status", {"job_id": job}))["state"] == "running")

            await until(running, 10, "the job to run")
            t1 = time.monotonic()
            reply = await jlm.call(
                "cancel", {"job_id": job, "running": True}, message_id=masters.message_id_on(1, "c")
            )
            assert reply["cancelled"] is True, reply

            async def stopped() -> bool:
                status = await jlm.call("status", {"job_id": job})
                return any("stopped by worker" in (h["reason"] or "") for h in status["history"])

            await until(stopped, 2, "the stop")
            stop_in = time.monotonic() - t1
            assert f"job {job} cancelled: stopping its handler" in worker.tail(200)
            print(
                f"\nsubscribed node killed: listening on another node after {moved_in:.2f}s;"
                f" a cancel stopped the job after {stop_in:.2f}s"
            )
    except BaseException:
        if worker is not None:
            print(f"--- worker log\n{worker.tail(80)}")
        raise
    finally:
        if worker is not None:
            worker.close()
        await daemon.stop()
        await client.aclose()
        cluster.stop()
