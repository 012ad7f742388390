"""`JobsClient` and its blocking twin against a real daemon, worker, Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from tests.amqp_helpers import take, tap
from tests.support.daemon import env_for
from tests.support.services import start_daemon

from jlm import tracing
from jlm.blocking import BlockingJobsClient
from jlm.client import Decision, JobsClient, JobStatus
from jlm.client_errors import (
    BrokerUnavailable,
    InvalidRequest,
    JobFailed,
    JobsError,
    JobTimeout,
    NotFound,
    RequestFailed,
)
from jlm.config import Settings
from jlm.worker import Job, Worker

ROOT = Path(__file__).resolve().parent.parent
JOB_TYPE = "jc"


async def handle(job: Job) -> dict[str, Any]:
    if job.payload.get("fail"):
        raise RuntimeError("asked to fail")
    if job.payload.get("sleep"):
        await asyncio.sleep(job.payload["sleep"])
    return {"echo": job.payload, "trace_id": job.trace_id}


@dataclass
class Stack:
    settings: Settings
    url: str


@pytest.fixture
async def stack(make_settings: Callable[..., Settings]) -> AsyncIterator[Stack]:
    """A daemon and a worker of JOB_TYPE."""
    settings = make_settings()
    running = await start_daemon(settings)
    worker = Worker(settings, handle, JOB_TYPE)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.started.wait(), 20)
        yield Stack(settings, settings.amqp_urls[0])
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await running.stop()


@pytest.mark.unit
def test_importing_the_client_imports_no_redis() -> None:
    for module in ("jlm.client", "jlm.blocking"):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"import {module}"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=True,
        )
        imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
        assert module in imported  # the measurement saw the import
        assert not [m for m in imported if m.split(".")[0] == "redis"], module


def _code_lines(path: Path) -> int:
    """Lines of a script that are neither blank nor its docstring."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return len([line for line in lines if not line.startswith('"""')])


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("script", "prefix"),
    [("publisher", "tenant-a"), ("publisher_blocking", "tenant-b")],
)
async def test_a_publisher_script_of_ten_lines_manages_waits_and_reads(
    stack: Stack, script: str, prefix: str
) -> None:
    assert _code_lines(ROOT / "examples" / f"{script}.py") <= 10
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        f"examples.{script}",
        env=env_for(stack.settings, JOB_TYPE=JOB_TYPE),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    state, _, result = out.decode().strip().partition(" ")
    assert state == "pending"
    assert result.startswith("{'echo': {'user': 42}, 'trace_id': '")
    async with JobsClient.connect(stack.url) as jobs:
        cached = await jobs.cached(JOB_TYPE, prefix=prefix)
    assert cached.cached is True
    assert cached.result["echo"] == {"user": 42}


@pytest.mark.timeout(90)
async def test_requests_use_direct_reply_to_a_message_id_and_the_trace(stack: Stack) -> None:
    trace = tracing.new_trace()
    async with await aio_pika.connect(stack.url) as conn:
        ch = await conn.channel()
        requests = await tap(ch, "jlm.requests", "#")
        async with JobsClient.connect(stack.url) as jobs:
            with tracing.using(trace):
                decision = await jobs.manage(JOB_TYPE, {"n": 1}, prefix="dr", priority=9)
            assert isinstance(decision, Decision)
            result = await jobs.job(decision.new_job_id).result(timeout=15)
        seen = await take(requests, 3, timeout=10)  # manage, then at least status and result
    manage = seen[0]
    assert manage.routing_key == "manage"
    assert (manage.reply_to or "").startswith("amq.rabbitmq.reply-to")
    assert all(m.message_id for m in seen)
    assert len({m.message_id for m in seen}) == len(seen)
    assert (manage.headers or {})["traceparent"] == trace.traceparent
    assert orjson.loads(manage.body)["priority"] == 9
    assert result == {"echo": {"n": 1}, "trace_id": trace.trace_id}


@pytest.mark.timeout(90)
async def test_typed_replies_and_errors(stack: Stack) -> None:
    jobs = await JobsClient.connect(stack.url, timeout=20)
    try:
        slow = await jobs.manage(JOB_TYPE, {"sleep": 30}, prefix="slow")
        job = jobs.job(slow.new_job_id)
        with pytest.raises(JobTimeout):
            await job.result(timeout=0.5)
        await asyncio.sleep(0.5)
        status = await job.status()
        assert isinstance(status, JobStatus)
        assert status.state == "running"
        cancelled = await job.cancel(running=True)
        assert (cancelled.cancelled, cancelled.state) == (True, "cancelled")

        failing = jobs.job((await jobs.manage(JOB_TYPE, {"fail": True}, prefix="f")).new_job_id)
        with pytest.raises(JobFailed, match="asked to fail") as failed:
            await failing.result(timeout=30)
        assert failed.value.code == "job_failed"

        with pytest.raises(NotFound) as missing:
            await jobs.job(f"0000000000-{uuid.uuid4().hex}").status()
        assert missing.value.code == "not_found"
        assert isinstance(missing.value, RequestFailed)
        with pytest.raises(InvalidRequest) as invalid:
            await jobs.manage("not a job type", {})
        assert invalid.value.code == "invalid_request"
        assert "job_type" in invalid.value.message
    finally:
        await jobs.aclose()


@pytest.mark.timeout(60)
async def test_settings_give_the_connection_options_and_the_url_wins(stack: Stack) -> None:
    elsewhere = stack.settings.model_copy(update={"amqp_url": "amqp://nobody@127.0.0.1:1/"})
    async with JobsClient.connect(stack.url, settings=elsewhere, user_id="guest") as jobs:
        with pytest.raises(NotFound):
            await jobs.status(f"0000000000-{uuid.uuid4().hex}")


@pytest.mark.timeout(60)
async def test_a_vhost_without_a_daemon_is_broker_unavailable(settings: Settings) -> None:
    async with JobsClient.connect(settings.amqp_urls[0], timeout=5) as jobs:
        with pytest.raises(BrokerUnavailable) as exc:
            await jobs.status("x")
    assert exc.value.code == "unavailable"
    with pytest.raises(JobsError):
        async with JobsClient.connect("amqp://guest:guest@127.0.0.1:1/"):
            pass


def _blocking_scenario(url: str) -> tuple[Any, str, str | None]:
    """Plain Python, no event loop of its own: manage, wait, read, and a typed error."""
    with BlockingJobsClient.connect(url) as jobs:
        decision = jobs.manage(JOB_TYPE, {"n": 2}, prefix="blk")
        job = jobs.job(decision.new_job_id)
        result = job.result(timeout=30)
        try:
            jobs.status(f"0000000000-{uuid.uuid4().hex}")
        except NotFound as exc:
            code = exc.code
        return result, job.status().state, code


@pytest.mark.timeout(90)
async def test_the_blocking_twin(stack: Stack) -> None:
    # In a thread: this test's event loop runs the daemon and the worker meanwhile.
    result, state, code = await asyncio.to_thread(_blocking_scenario, stack.url)
    assert result["echo"] == {"n": 2}
    assert (state, code) == ("succeeded", "not_found")
