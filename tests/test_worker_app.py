"""`jlm worker MODULE:APP`: one process serving an app's job types, each with its concurrency;
typed payloads. Real `jlm worker` processes, the daemon, Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from tests.amqp_helpers import read_stream
from tests.support.services import start_daemon
from tests.test_worker import ROOT, WorkerProcess, until, worker_env

from jlm.client import Client
from jlm.config import Settings
from jlm.keys import Keys, scope_tag
from jlm.store import RedisClient
from jlm.worker import App, Job, Worker
from jlm.worker.registry import routes_of

# The job types of examples/app.py and their concurrency.
LIMITS = {"report.render": 2, "thumb.make": 4, "mail.send": 8}


def payload_of(job_type: str, i: int) -> dict[str, Any]:
    if job_type == "thumb.make":
        return {"image": f"img-{i}.png", "width": 64 + i % 100}
    if job_type == "mail.send":
        return {"to": f"user{i}@example.org"}
    return {"pages": 2, "page_seconds": 0.002}


async def submit(client: Client, job_type: str, prefix: str, payload: dict[str, Any]) -> str:
    body = {"job_type": job_type, "cache_prefix": prefix, "payload": payload}
    reply = await client.call("manage", body)
    assert reply["success"] is True, reply
    return str(reply["new_job_id"])


async def job_records(redis: RedisClient, namespace: str, ids: list[str]) -> list[dict[str, str]]:
    pipe = redis.pipeline(transaction=False)
    keys = Keys(namespace)
    for job_id in ids:
        pipe.hgetall(keys.job(job_id))
    return [{k.decode(): v.decode() for k, v in raw.items()} for raw in await pipe.execute()]


def max_overlap(intervals: list[tuple[str, str]]) -> int:
    """The largest number of [start, end] intervals open at once. A run ends before the next one
    on its slot is claimed (its message is settled after the finish, and only then is another
    delivered), so at equal times an end is counted before a start."""
    points = sorted(
        [(datetime.fromisoformat(a), 1) for a, _ in intervals]
        + [(datetime.fromisoformat(b), -1) for _, b in intervals]
    )
    best = now = 0
    for _, step in points:
        now += step
        best = max(best, now)
    return best


async def rabbitmqctl_json(*args: str) -> Any:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, "-q", "--formatter", "json", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    return orjson.loads(out)


async def worker_channels(settings: Settings) -> list[tuple[int, int]]:
    """(prefetch, consumers) of every channel of the vhost's `jlm worker` connections, and
    asserts there is exactly one such connection."""
    vhost = settings.amqp_url.rpartition("/")[2]
    conns = await rabbitmqctl_json("list_connections", "-p", vhost, "pid", "client_properties")
    workers = [
        c["pid"]
        for c in conns
        if any(
            p[0] == "connection_name" and str(p[2]).startswith("jlm worker")
            for p in c["client_properties"]
        )
    ]
    assert len(workers) == 1, workers
    channels = await rabbitmqctl_json(
        "list_channels", "-p", vhost, "connection", "prefetch_count", "consumer_count"
    )
    return sorted(
        (ch["prefetch_count"], ch["consumer_count"])
        for ch in channels
        if ch["connection"] == workers[0]
    )


def start_app(
    settings: Settings, tmp_path: Path, target: str = "examples.app:app"
) -> WorkerProcess:
    log = tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log"
    return WorkerProcess(settings, target, log, job_type=None)


@pytest.mark.timeout(240)
async def test_one_app_process_runs_three_thousand_jobs_of_three_types_exactly_once(  # noqa: PLR0917 - fixtures arrive as parameters
    daemon: Any,
    client: Client,
    settings: Settings,
    redis_client: RedisClient,
    namespace: str,
    tmp_path: Path,
) -> None:
    n = 3000
    types = list(LIMITS)
    w = start_app(settings, tmp_path)
    try:
        await w.ready()
        # One connection: a publish channel, and a consumer per job type with its concurrency.
        assert await worker_channels(settings) == [(0, 0), (2, 1), (4, 1), (8, 1)]
        t0 = time.monotonic()
        ids: dict[str, str] = {}  # job id -> job type
        for chunk in range(0, n, 250):
            batch = [(types[i % 3], i) for i in range(chunk, chunk + 250)]
            got = await asyncio.gather(
                *(submit(client, t, f"a{i}", payload_of(t, i)) for t, i in batch)
            )
            ids.update(zip(got, [t for t, _ in batch], strict=True))
        assert len(ids) == n

        async def all_finished() -> bool:
            done = sum(
                w.metric("jlm_jobs_finished_total", job_type=t, state="succeeded") for t in types
            )
            return done >= n

        await until(all_finished, 180, f"{n} jobs to succeed")
        elapsed = time.monotonic() - t0
        records = await job_records(redis_client, namespace, list(ids))
        assert {r["state"] for r in records} == {"succeeded"}
        assert {r["attempt"] for r in records} == {"1"}, "a job ran more than once"
        for t in types:
            assert w.metric("jlm_jobs_claimed_total", job_type=t) == n // 3
        overlaps = {}
        for t, limit in LIMITS.items():
            runs = [
                (r["started_at"], r["finished_at"])
                for job_id, r in zip(ids, records, strict=True)
                if ids[job_id] == t
            ]
            overlaps[t] = max_overlap(runs)
            assert 1 <= overlaps[t] <= limit, (t, overlaps[t], limit)
        print(f"\n{n} jobs over {types}: all succeeded once in {elapsed:.1f}s; ", end="")
        print(f"max concurrent runs per type {overlaps} (limits {LIMITS})")
    finally:
        w.close()


async def test_a_payload_failing_its_model_fails_at_once_with_the_validation_message(
    daemon: Any, client: Client, settings: Settings, tmp_path: Path
) -> None:
    w = start_app(settings, tmp_path)
    try:
        await w.ready()
        job = await submit(client, "thumb.make", "bad", {"image": "cat.png", "width": -1})
        status = await until(
            lambda: _state_in(client, job, "failed"), 15, "the job with a bad payload to fail"
        )
        assert status["attempt"] == 1
        assert "invalid payload" in status["error"]
        assert "width" in status["error"]
        assert "greater than 0" in status["error"]
        assert w.metric("jlm_jobs_finished_total", job_type="thumb.make", state="failed") == 1
        assert w.metric("jlm_jobs_claimed_total", job_type="thumb.make") == 1
        await asyncio.sleep(0.3)  # the outcome's event follows the ack
        (failed,) = [e for e in await read_stream(settings) if e["type"] == "job.failed"]
        assert (failed["job_id"], failed["status"]) == (job, "failed")
        assert failed["metadata"]["output"]["error"] == status["error"]
    finally:
        w.close()


async def _state_in(client: Client, job_id: str, *states: str) -> dict[str, Any] | None:
    status = await client.call("status", {"job_id": job_id})
    return status if status["state"] in states else None


def test_an_app_registers_each_job_type_once_with_its_settings(settings: Settings) -> None:
    app = App()

    @app.job("a.b", concurrency=3)
    async def ab(job: Job) -> None: ...

    with pytest.raises(ValueError, match="registered twice"):
        app.job("a.b")(ab)
    with pytest.raises(ValueError, match="must match"):
        app.job("no spaces")
    with pytest.raises(ValueError, match="at least 1"):
        app.job("c", concurrency=0)
    routes = routes_of(settings, app, None, 1)
    assert list(routes) == ["a.b"]
    assert routes["a.b"].concurrency == 3
    assert routes["a.b"].queue == "jlm.jobs.a.b"
    with pytest.raises(ValueError, match="no handler"):
        routes_of(settings, app, "other", 1)


async def test_a_worker_without_config_runs_a_job_type_with_the_daemons_settings(
    make_settings: Any, redis_client: RedisClient, namespace: str, tmp_path: Path
) -> None:
    """max_attempts, result_ttl, retry_backoff and queue are configured for the daemon only; the
    worker (no JLM_CONFIG) reads them from the job's record."""
    config = tmp_path / "daemon.toml"
    config.write_text(
        '[job_types."cfgd"]\nmax_attempts = 3\nresult_ttl = 60\nretry_backoff = 0.05\n'
    )
    settings = make_settings(JLM_CONFIG=str(config))
    daemon = await start_daemon(settings)
    log = tmp_path / "worker.log"
    w = WorkerProcess(settings, "tests.worker_handlers:flaky", log, job_type="cfgd")
    try:
        async with Client(settings) as client:
            await w.ready()
            assert "JLM_CONFIG" not in w.proc.args  # and not in its environment (jlm_env)
            job = await submit(client, "cfgd", "c1", {"succeed_on": 3})
            status = await until(lambda: _state_in(client, job, "succeeded"), 20, "the job")
            assert status["attempt"] == 3
            retries = [h for h in status["history"] if "retrying" in (h["reason"] or "")]
            assert len(retries) == 2
            record = (await job_records(redis_client, namespace, [job]))[0]
            assert (record["max_attempts"], record["result_ttl"]) == ("3", "60")
            assert (record["retry_backoff"], record["queue"]) == ("0.05", "jlm.jobs.cfgd")
            result = await client.call("result", {"job_type": "cfgd", "cache_prefix": "c1"})
            assert result["result"] == {"attempt": 3}
            ttl = await redis_client.ttl(
                Keys(namespace).result(scope_tag("c1", "cfgd"), "c1", "cfgd")
            )
            assert 55 <= ttl <= 60, ttl
            failed = [e for e in await read_stream(settings) if e["type"] == "job.failed"]
            assert [e["metadata"]["output"]["retry_in_s"] for e in failed] == [0.05, 0.1]
            assert {e["metadata"]["output"]["max_attempts"] for e in failed} == {3}
            print(f"\nno worker config: 3 attempts, result TTL read {ttl}s (daemon: result_ttl 60)")
    finally:
        w.close()
        await daemon.stop()


async def test_an_app_in_process_runs_its_hooks_around_its_jobs_and_logs_per_job(
    daemon: Any, client: Client, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = App()
    seen: list[str] = []

    @app.on_startup
    async def open_pool(a: App) -> None:
        a.state.pool = "open"
        seen.append("startup")

    @app.on_shutdown
    async def close_pool(a: App) -> None:
        seen.append(f"shutdown ({a.state.pool})")
        a.state.pool = "closed"

    @app.job("hooked", concurrency=2)
    async def hooked(job: Job) -> dict[str, Any]:
        seen.append(f"job with pool {app.state.pool}")
        job.log.info("rendering for %s", job.payload["who"])
        return {"pool": app.state.pool}

    caplog.set_level("INFO", logger="jlm.job")
    worker = Worker(settings, app)
    running = asyncio.create_task(worker.run())
    try:
        await until(lambda: worker.started.is_set() or running.done(), 20, "the worker")
        job = await submit(client, "hooked", "h1", {"who": "ann"})
        await until(lambda: _state_in(client, job, "succeeded"), 10, "the job")
    finally:
        worker.stop()
        await asyncio.wait_for(running, 20)
    assert seen == ["startup", "job with pool open", "shutdown (open)"]
    (line,) = [r for r in caplog.records if r.name == "jlm.job"]
    assert line.getMessage() == "rendering for ann"
    fields = (
        getattr(line, "job_id", None),
        getattr(line, "job_type", None),
        getattr(line, "attempt", None),
    )
    assert fields == (job, "hooked", 1)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["examples.app", "--job-type", "nope"], "the app has no handler for nope"),
        (["examples.app:render"], "a handler needs its job type"),
        (["examples.app:ThumbIn"], "neither an App nor an async function"),
        (["examples.nothing"], "cannot import 'examples.nothing'"),
    ],
)
async def test_jlm_worker_refuses_a_wrong_target_with_exit_2(
    settings: Settings, args: list[str], says: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "jlm", "worker", *args),
        env=worker_env(settings),
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2, err
    assert says in err.decode()
