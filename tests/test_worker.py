"""The worker SDK end to end: real `jlm worker` processes, the daemon, Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
import inspect
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from tests.amqp_helpers import read_stream
from tests.support.daemon import jlm_env, wait_exit
from tests.support.ports import free_port
from tests.support.services import RunningDaemon
from tests.worker_handlers import key

from jlm.client import Client
from jlm.config import Settings
from jlm.store import RedisClient
from jlm.worker import Job, Worker

ROOT = Path(__file__).resolve().parent.parent
JOB_TYPE = "wtest"
_WORKER = [sys.executable, "-m", "jlm", "worker"]


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    return jlm_env(
        settings.amqp_url,
        settings.redis_url,
        settings.redis_namespace,
        **{
            "JLM_REDIS_CLUSTER": "true" if settings.redis_cluster else "false",
            "JLM_LOG_FORMAT": "text",
            **extra,
        },
    )


class WorkerProcess:
    """`python -m jlm worker <target> [--job-type T]` with the test's settings."""

    def __init__(
        self,
        settings: Settings,
        target: str,
        log_path: Path,
        *,
        job_type: str | None = JOB_TYPE,
        concurrency: int = 1,
        **env: str,
    ) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = log_path.open("ab")
        # With no job type the target is an app: it serves its job types, each its concurrency.
        args = (
            [] if job_type is None else ["--job-type", job_type, "--concurrency", str(concurrency)]
        )
        self.proc = subprocess.Popen(
            [*_WORKER, target, *args],
            env=worker_env(settings, JLM_WORKER_METRICS_ADDR=f"127.0.0.1:{self.port}", **env),
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _get(self, path: str) -> tuple[int, str]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.decode().partition("\r\n\r\n")
        return int(head.split()[1]), body

    async def ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}: {self.tail()}")
            try:
                if self._get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"worker not ready in {timeout}s: {self.tail()}")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics (0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self._get("/metrics")[1].splitlines():
            if line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            sname, _, rest = series.partition("{")
            got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
            if sname == name and got == want:
                return float(value)
        return 0.0

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    async def exited(self, timeout: float = 30) -> int:
        return await wait_exit(self.proc, timeout, "the worker")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Env:
    """The daemon, a client, Redis, and a way to start workers, for one test."""

    daemon: RunningDaemon
    client: Client
    settings: Settings
    redis: RedisClient
    namespace: str
    tmp_path: Path

    @asynccontextmanager
    async def workers(
        self, handler: str, n: int = 1, *, ready: bool = True, **kw: Any
    ) -> AsyncIterator[list[WorkerProcess]]:
        """`n` workers running tests.worker_handlers:<handler>, killed at the end."""
        target = handler if ":" in handler else f"tests.worker_handlers:{handler}"
        procs: list[WorkerProcess] = []
        try:
            for _ in range(n):
                log = self.tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log"
                procs.append(WorkerProcess(self.settings, target, log, **kw))
            if ready:
                await asyncio.gather(*(p.ready() for p in procs))
            yield procs
        except BaseException:
            for p in procs:
                print(f"--- {p.log_path.name} (exit {p.proc.poll()})\n{p.tail()}", file=sys.stderr)
            raise
        finally:
            for p in procs:
                p.close()

    def key(self, name: str) -> str:
        return key(name, self.namespace)

    async def submit(self, prefix: str, **fields: Any) -> str:
        body = {"job_type": JOB_TYPE, "payload": {}, "cache_prefix": prefix} | fields
        reply = await self.client.call("manage", body)
        assert reply["success"] is True, reply
        return str(reply["new_job_id"])

    async def status(self, job_id: str) -> dict[str, Any]:
        return await self.client.call("status", {"job_id": job_id})

    async def status_is(self, job_id: str, *states: str) -> dict[str, Any] | None:
        status = await self.status(job_id)
        return status if status["state"] in states else None

    async def history_has(self, job_id: str, text: str) -> dict[str, Any] | None:
        status = await self.status(job_id)
        return status if any(text in (h["reason"] or "") for h in status["history"]) else None

    async def result(self, prefix: str) -> dict[str, Any]:
        return await self.client.call("result", {"job_type": JOB_TYPE, "cache_prefix": prefix})

    async def runs(self) -> dict[str, int]:
        raw = await self.redis.hgetall(self.key("runs"))
        return {k.decode(): int(v) for k, v in raw.items()}

    async def started(self, job_id: str) -> bool:
        return bool(await self.redis.exists(self.key(f"started:{job_id}")))

    def config(self, **job_type: Any) -> str:
        """A JLM_CONFIG file with these settings for the test's job type."""
        lines = [f'[job_types."{JOB_TYPE}"]'] + [f"{k} = {v!r}" for k, v in job_type.items()]
        path = self.tmp_path / f"jlm-{uuid.uuid4().hex[:6]}.toml"
        path.write_text("\n".join(lines) + "\n")
        return str(path)


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


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `predicate` (plain or async) until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


# -- 1. a superseded job never runs ------------------------------------------------------------


async def test_superseded_job_never_runs_and_its_successor_runs_once(env: Env) -> None:
    a = await env.submit("s1", payload={"v": 1})
    b = await env.submit("s1", payload={"v": 2})
    assert await env.status_is(a, "cancelled")
    async with env.workers("count") as (w,):
        await until(lambda: env.status_is(b, "succeeded"), 20, "the successor to succeed")
        skipped = {"job_type": JOB_TYPE, "reason": "cancelled"}
        await until(lambda: w.metric("jlm_jobs_skipped_total", **skipped), 5, "the skip")
        assert await env.runs() == {b: 1}
        assert await env.status_is(a, "cancelled")
        result = await env.result("s1")
        assert result["cached"] is True
        assert result["job_id"] == b
        assert result["result"] == {"job": b, "echo": {"v": 2}}
        assert w.metric("jlm_jobs_claimed_total", job_type=JOB_TYPE) == 1
        assert w.metric("jlm_jobs_finished_total", job_type=JOB_TYPE, state="succeeded") == 1


# -- 2. many workers, many jobs: each runs exactly once ----------------------------------------


async def _job_states(env: Env) -> dict[str, int]:
    job_keys = [
        k
        async for k in env.redis.scan_iter(match=f"{env.namespace}:{{*}}:job:*", count=1000)
        if not k.endswith(b":h")
    ]
    pipe = env.redis.pipeline(transaction=False)
    for k in job_keys:
        pipe.hget(k, "state")
    seen: dict[str, int] = {}
    for state in await pipe.execute():
        seen[state.decode()] = seen.get(state.decode(), 0) + 1
    return seen


async def test_three_workers_run_two_thousand_jobs_exactly_once(env: Env) -> None:
    n = 2000
    async with env.workers("count", 3, concurrency=4) as procs:
        started = time.monotonic()
        ids: list[str] = []
        for chunk in range(0, n, 250):
            ids += await asyncio.gather(
                *(env.submit(f"p{i}", payload={"i": i}) for i in range(chunk, chunk + 250))
            )
        submitted = time.monotonic() - started
        assert len(set(ids)) == n

        async def all_ran() -> bool:
            return int(await env.redis.hlen(env.key("runs"))) >= n

        await until(all_ran, 60, f"{n} jobs to run")
        elapsed = time.monotonic() - started
        counted = await env.runs()
        assert set(counted) == set(ids)
        assert set(counted.values()) == {1}, "a job ran more than once"

        async def all_succeeded() -> bool:
            return await _job_states(env) == {"succeeded": n}

        await until(all_succeeded, 10, "every job to be succeeded (none pending or running)")
        claims = [p.metric("jlm_jobs_claimed_total", job_type=JOB_TYPE) for p in procs]
        assert sum(claims) == n
        assert all(c > 0 for c in claims), claims
        print(f"\n{n} jobs: submitted in {submitted:.1f}s, all run after {elapsed:.1f}s; {claims}")


# -- 3. cancelling a running job ---------------------------------------------------------------


async def test_cancelling_a_running_job_stops_its_handler_within_two_seconds(env: Env) -> None:
    async with env.workers("sleepy") as (w,):
        job = await env.submit("c1", payload={"seconds": 4})
        await until(lambda: env.started(job), 10, "the handler to start")
        t0 = time.monotonic()
        reply = await env.client.call("cancel", {"job_id": job, "running": True})
        assert reply["cancelled"] is True
        assert reply["state"] == "cancelled"
        status = await until(lambda: env.history_has(job, "stopped by worker"), 2, "the stop")
        stopped_in = time.monotonic() - t0
        assert status["state"] == "cancelled"
        assert stopped_in < 2.0
        # The handler really stopped: its `done` marker never appears, even after its sleep.
        await asyncio.sleep(max(0.0, 4.5 - (time.monotonic() - t0)))
        assert not await env.redis.exists(env.key(f"done:{job}"))
        assert await env.runs() == {job: 1}
        assert w.metric("jlm_jobs_finished_total", job_type=JOB_TYPE, state="cancelled") == 1
        assert w.metric("jlm_cancel_latency_seconds_count") == 1
        latency = w.metric("jlm_cancel_latency_seconds_sum")
        assert 0 < latency < 2.0
        assert (await env.result("c1"))["cached"] is False
        print(f"\ncancel: stop seen in status after {stopped_in * 1000:.0f} ms; ", end="")
        print(f"cancel_requested -> handler stopped {latency * 1000:.1f} ms")


async def test_manage_with_cancel_running_stops_the_running_job(env: Env) -> None:
    async with env.workers("sleepy", concurrency=2):
        old = await env.submit("c2", payload={"seconds": 5, "v": "old"})
        await until(lambda: env.started(old), 10, "the handler to start")
        t0 = time.monotonic()
        body = {"job_type": JOB_TYPE, "cache_prefix": "c2", "cancel_running": True}
        reply = await env.client.call("manage", body | {"payload": {"seconds": 0, "v": "new"}})
        # The reply says the running job was stopped (and which), not only that a job was made.
        assert (reply["running_cancelled"], reply["previous_job_id"]) == (True, old), reply
        new = str(reply["new_job_id"])
        await until(lambda: env.history_has(old, "stopped by worker"), 2, "the stop")
        assert time.monotonic() - t0 < 2.0
        await until(lambda: env.status_is(new, "succeeded"), 10, "the new job")
        assert (await env.result("c2"))["result"] == {"v": "new", "attempt": 1}
        assert not await env.redis.exists(env.key(f"done:{old}"))


async def test_a_handler_ignoring_cancellation_is_abandoned_after_the_grace(env: Env) -> None:
    async with env.workers("stubborn") as (w,):
        job = await env.submit("c3", payload={"seconds": 3})
        await until(lambda: env.started(job), 10, "the handler to start")
        t0 = time.monotonic()
        await env.client.call("cancel", {"job_id": job, "running": True})
        status = await until(lambda: env.history_has(job, "abandoned"), 2, "the abandon")
        assert time.monotonic() - t0 < 2.0
        assert status["state"] == "cancelled"
        assert w.metric("jlm_handlers_abandoned_total", job_type=JOB_TYPE) == 1
        # It ends on its own later; nothing it does is recorded as the job's outcome.
        await until(lambda: env.redis.exists(env.key(f"done:{job}")), 5, "the handler to end")
        await asyncio.sleep(0.2)
        assert (await env.result("c3"))["cached"] is False
        assert await env.status_is(job, "cancelled")


# -- 4. a worker killed mid-job ----------------------------------------------------------------


@pytest.mark.parametrize("max_attempts", [2, 1])
async def test_a_job_of_a_killed_worker_is_recovered(env: Env, max_attempts: int) -> None:
    cfg = {
        "JLM_CONFIG": env.config(max_attempts=max_attempts, retry_backoff=0.1),
        "JLM_LEASE_SECONDS": "2",
    }
    async with env.workers("sleepy", **cfg) as (w1,):
        job = await env.submit("k1", payload={"seconds": 30, "first_only": True})
        await until(lambda: env.started(job), 10, "the handler to start")
        async with env.workers("sleepy", **cfg) as (w2,):
            w1.signal(signal.SIGKILL)
            killed = time.monotonic()
            final = "succeeded" if max_attempts == 2 else "failed"
            status = await until(lambda: env.status_is(job, final), 15, f"the job to be {final}")
            took = time.monotonic() - killed
            reasons = [h["reason"] or "" for h in status["history"]]
            assert any("lost" in r for r in reasons), reasons
            if max_attempts == 2:
                assert status["attempt"] == 2
                assert await env.runs() == {job: 2}
                outcome = "retried"
            else:
                assert status["error"] == "worker lost"
                assert await env.runs() == {job: 1}
                outcome = "failed"
            assert w2.metric("jlm_jobs_recovered_total", job_type=JOB_TYPE, outcome=outcome) == 1
            print(f"\nmax_attempts {max_attempts}: {final} {took:.2f}s after SIGKILL (lease 2 s)")


# -- 5. a late result of a superseded job ------------------------------------------------------


async def test_a_superseded_job_finishing_late_does_not_overwrite_its_successor(env: Env) -> None:
    async with env.workers("sleepy", concurrency=2) as (w,):
        old = await env.submit("z1", payload={"seconds": 2, "v": "old"})
        await until(lambda: env.started(old), 10, "the old job to start")
        new = await env.submit("z1", payload={"seconds": 0, "v": "new"})
        await until(lambda: env.status_is(new, "succeeded"), 10, "the new job to succeed")
        status = await until(lambda: env.status_is(old, "succeeded"), 10, "the old job to end")
        assert status["superseded_by"] == new
        assert any("not cached" in (h["reason"] or "") for h in status["history"])
        assert await env.redis.exists(env.key(f"done:{old}"))  # it did finish, late
        result = await env.result("z1")
        assert result["job_id"] == new
        assert result["result"] == {"v": "new", "attempt": 1}
        assert w.metric("jlm_zombie_completions_total", job_type=JOB_TYPE) == 1


# -- 6. a backlog is served by priority --------------------------------------------------------


async def test_a_backlog_runs_highest_priority_first(env: Env) -> None:
    n, prefetch = 1000, 1
    rng = random.Random(7)
    priorities = [rng.randint(1, 10) for _ in range(n)]
    t0 = time.monotonic()
    for chunk in range(0, n, 250):
        await asyncio.gather(
            *(env.submit(f"o{i}", priority=priorities[i]) for i in range(chunk, chunk + 250))
        )
    submitted = time.monotonic() - t0
    async with env.workers("ordered", concurrency=prefetch):
        t1 = time.monotonic()

        async def done() -> bool:
            return int(await env.redis.llen(env.key("order"))) >= n

        await until(done, 60, f"{n} jobs to run")
        ran = time.monotonic() - t1
    order = [int(p) for p in await env.redis.lrange(env.key("order"), 0, -1)]
    assert sorted(order) == sorted(priorities)
    tail = order[prefetch:]
    rises = [i for i in range(1, len(tail)) if tail[i] > tail[i - 1]]
    assert not rises, f"priority went up at {rises[:10]}: {order[:40]}"
    print(f"\nbacklog of {n}: submitted in {submitted:.1f}s, run by one worker in {ran:.1f}s")


# -- the rest of the protocol ------------------------------------------------------------------


async def test_sigterm_lets_a_running_job_finish_and_exits_zero(env: Env) -> None:
    async with env.workers("sleepy") as (w,):
        job = await env.submit("g1", payload={"seconds": 1})
        await until(lambda: env.started(job), 10, "the handler to start")
        w.signal(signal.SIGTERM)
        assert await w.exited(15) == 0
        assert await env.status_is(job, "succeeded")
        assert (await env.result("g1"))["result"] == {"v": None, "attempt": 1}


async def test_sigterm_past_the_grace_releases_the_job_for_another_worker(env: Env) -> None:
    async with env.workers("sleepy", JLM_WORKER_SHUTDOWN_TIMEOUT="0.5") as (w,):
        job = await env.submit("g2", payload={"seconds": 30})
        await until(lambda: env.started(job), 10, "the handler to start")
        t0 = time.monotonic()
        w.signal(signal.SIGTERM)
        assert await w.exited(15) == 0
        assert time.monotonic() - t0 < 5
        status = await env.status(job)
        assert status["state"] == "pending"
        assert status["attempt"] == 0  # a release is not a failed attempt
        assert "released: worker stopping" in status["history"][-1]["reason"]
        assert not await env.redis.exists(env.key(f"done:{job}"))
    async with env.workers("count"):
        done = await until(lambda: env.status_is(job, "succeeded"), 10, "the released job")
        assert done["attempt"] == 1
        assert await env.runs() == {job: 2}  # once stopped by sleepy, once run by count


async def test_a_failing_job_is_retried_then_failed(env: Env) -> None:
    cfg = env.config(max_attempts=3, retry_backoff=0.05)
    async with env.workers("failing", JLM_CONFIG=cfg) as (w,):
        job = await env.submit("f1")
        status = await until(lambda: env.status_is(job, "failed"), 15, "the job to fail")
        assert status["attempt"] == 3
        assert status["error"] == "RuntimeError: boom on attempt 3"
        assert await env.runs() == {job: 3}
        retries = [h for h in status["history"] if "retrying" in (h["reason"] or "")]
        assert [h["state"] for h in retries] == ["pending", "pending"]
        assert w.metric("jlm_jobs_finished_total", job_type=JOB_TYPE, state="failed") == 1
        assert w.metric("jlm_jobs_claimed_total", job_type=JOB_TYPE) == 3
        assert (await env.result("f1"))["cached"] is False


async def test_worker_events_follow_the_contract(env: Env) -> None:
    async with env.workers("count") as (w,):
        reply = await env.client.call(
            "manage",
            {"job_type": JOB_TYPE, "payload": {"x": 1}, "cache_prefix": "e1"},
            message_id="req-e1",
        )
        job = reply["new_job_id"]
        await until(lambda: env.status_is(job, "succeeded"), 10, "the job")
        await until(
            lambda: w.metric("jlm_jobs_finished_total", job_type=JOB_TYPE, state="succeeded"),
            5,
            "the worker to count it",
        )
        await asyncio.sleep(0.3)
    events = [e for e in await read_stream(env.settings) if e["job_id"] == job]
    # The stream holds events in arrival order: the daemon publishes job.enqueued after the job's
    # confirm, so the worker's job.claimed may arrive first. Their `at` is the order of the facts.
    events.sort(key=lambda e: str(e["at"]))
    assert [e["type"] for e in events] == ["job.enqueued", "job.claimed", "job.succeeded"]
    claimed, succeeded = events[1], events[2]
    for e in (claimed, succeeded):
        assert set(e) == {
            "provenance_id",
            "type",
            "status",
            "at",
            "agent",
            "actor",
            "request_id",
            "job_id",
            "scope",
            "metadata",
        }
        assert e["actor"] is None
        assert e["request_id"] == "req-e1"
        assert e["agent"]["id"] == "job-lifecycle-manager"
        assert e["scope"] == {"cache_prefix": "e1", "job_type": JOB_TYPE}
        assert e["at"].endswith("Z")
        assert set(e["metadata"]) == {"input", "output"}
    assert claimed["status"] == "running"
    assert claimed["metadata"]["input"]["attempt"] == 1
    assert succeeded["status"] == "succeeded"
    assert succeeded["metadata"]["output"]["cached"] is True


async def test_the_echo_example_and_exit_codes(env: Env) -> None:
    async with env.workers("examples.echo:handle"):
        job = await env.submit("x1", payload={"hello": "world"})
        await until(lambda: env.status_is(job, "succeeded"), 10, "the echo job")
        assert (await env.result("x1"))["result"] == {"echo": {"hello": "world"}}

    def exit_code(target: str, **extra: str) -> int:
        done = subprocess.run(
            [*_WORKER, target, "--job-type", JOB_TYPE],
            env=worker_env(env.settings, **extra),
            cwd=ROOT,
            capture_output=True,
            timeout=30,
            check=False,
        )
        return done.returncode

    assert exit_code("tests.worker_handlers:nothing_here") == 2
    assert exit_code("no_such_module:handle") == 2
    assert exit_code("tests.worker_handlers:key") == 2  # not an async function
    assert exit_code("examples.echo:handle", JLM_AMQP_URL="amqp://guest:guest@127.0.0.1:1/") == 69
    assert exit_code("examples.echo:handle", JLM_REDIS_URL="redis://127.0.0.1:1/0") == 69


def queue_depth(env: Env, queue: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of a queue of the test's vhost."""
    vhost = env.settings.amqp_urls[0].rsplit("/", 1)[1]
    columns = ["name", "messages_ready", "messages_unacknowledged"]
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-p", vhost, "--quiet", "--no-table-headers", *columns],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    raise AssertionError(f"no queue {queue}")


async def test_a_duplicate_message_of_a_running_job_is_settled_while_it_runs(env: Env) -> None:
    async with env.workers("sleepy", 2, JLM_LEASE_SECONDS="3") as procs:
        job = await env.submit("d1", payload={"seconds": 6})
        await until(lambda: env.started(job), 10, "the handler to start")
        # The same job message again, as a replay would publish it: the idle worker gets it,
        # finds a live lease held by the other run, and acks it at once (the running worker
        # owns the job) instead of holding it until the lease ends.
        body = {
            "job_id": job,
            "job_type": JOB_TYPE,
            "cache_prefix": "d1",
            "payload": {"seconds": 6},
            "priority": 5,
            "enqueued_at": "2026-01-01T00:00:00.000Z",
        }
        conn = await aio_pika.connect(env.settings.amqp_urls[0])
        async with conn:
            ch = await conn.channel()
            jobs = await ch.get_exchange("jlm.jobs", ensure=False)
            await jobs.publish(
                aio_pika.Message(orjson.dumps(body), message_id=job, priority=5), JOB_TYPE
            )
        published = time.monotonic()

        def skipped() -> float:
            labels = {"job_type": JOB_TYPE, "reason": "running"}
            return sum(p.metric("jlm_jobs_skipped_total", **labels) for p in procs)

        await until(skipped, 5, "the duplicate to be settled")
        took = time.monotonic() - published
        assert (await env.status(job))["state"] == "running"  # settled while the job runs
        assert queue_depth(env, f"jlm.jobs.{JOB_TYPE}") == (0, 1)  # only the holder's
        await until(lambda: env.status_is(job, "succeeded"), 15, "the job to succeed")
        assert await env.runs() == {job: 1}
        assert sum(p.metric("jlm_jobs_claimed_total", job_type=JOB_TYPE) for p in procs) == 1
        print(f"\nduplicate of a running job settled {took:.2f}s after it was published")


async def test_a_job_is_recovered_after_its_duplicate_was_settled(env: Env) -> None:
    """The settled duplicate was not the job's only message: when the running worker dies, its
    own message comes back and the job runs again."""
    cfg = {"JLM_CONFIG": env.config(max_attempts=2, retry_backoff=0.1), "JLM_LEASE_SECONDS": "2"}
    async with env.workers("sleepy", **cfg) as (w1,):
        job = await env.submit("r1", payload={"seconds": 30, "first_only": True})
        await until(lambda: env.started(job), 10, "the handler to start")
        async with env.workers("sleepy", **cfg) as (w2,):
            body = {
                "job_id": job,
                "job_type": JOB_TYPE,
                "cache_prefix": "r1",
                "payload": {"seconds": 30, "first_only": True},
                "priority": 5,
            }
            conn = await aio_pika.connect(env.settings.amqp_urls[0])
            async with conn:
                ch = await conn.channel()
                jobs = await ch.get_exchange("jlm.jobs", ensure=False)
                await jobs.publish(
                    aio_pika.Message(orjson.dumps(body), message_id=job, priority=5), JOB_TYPE
                )
            labels = {"job_type": JOB_TYPE, "reason": "running"}
            await until(lambda: w2.metric("jlm_jobs_skipped_total", **labels), 5, "the skip")
            w1.signal(signal.SIGKILL)
            status = await until(lambda: env.status_is(job, "succeeded"), 20, "the recovery")
            assert status["attempt"] == 2
            assert await env.runs() == {job: 2}
            assert w2.metric("jlm_jobs_recovered_total", job_type=JOB_TYPE, outcome="retried") == 1


async def test_the_worker_class_in_process(env: Env) -> None:
    seen: list[Job] = []

    async def handle(job: Job) -> dict[str, int]:
        seen.append(job)
        return {"n": job.payload["n"] * 2}

    worker = Worker(env.settings, handle, JOB_TYPE, concurrency=2)
    running = asyncio.create_task(worker.run())
    try:
        await until(lambda: worker.started.is_set() or running.done(), 20, "the worker")
        job = await env.submit("api", payload={"n": 21}, priority=7)
        await until(lambda: env.status_is(job, "succeeded"), 10, "the job")
        assert (await env.result("api"))["result"] == {"n": 42}
        (got,) = seen
        assert (got.id, got.job_type, got.cache_prefix) == (job, JOB_TYPE, "api")
        assert (got.payload, got.priority, got.attempt) == ({"n": 21}, 7, 1)
    finally:
        worker.stop()
        await asyncio.wait_for(running, 20)


async def test_a_worker_without_configure_permission_uses_the_daemons_topology(env: Env) -> None:
    """As the `worker` user of deploy/rabbitmq/definitions.json: no configure permission."""
    vhost = env.settings.amqp_url.rpartition("/")[2]
    user = f"jlm-worker-{uuid.uuid4().hex[:6]}"

    def ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)

    job = await env.submit("perm", payload={"p": 1})  # the daemon declares the job queue
    ctl("add_user", user, "pw")
    try:
        ctl("set_permissions", "-p", vhost, user, "^$", r"^jlm\.(jobs|events)$", r"^jlm\.jobs\..*")
        url = env.settings.amqp_url.replace("guest:guest@", f"{user}:pw@", 1)
        async with env.workers("examples.echo:handle", JLM_AMQP_URL=url) as (w,):
            await until(lambda: env.status_is(job, "succeeded"), 10, "the job")
            assert (await env.result("perm"))["result"] == {"echo": {"p": 1}}
            assert "no configure permission" in w.tail()
    finally:
        ctl("delete_user", user)
