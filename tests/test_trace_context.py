"""W3C trace context end to end: a request's traceparent on its reply, its job message, its events,
inside the worker's handler and in the daemon's and the worker's log lines. Real `jlm run` and
`jlm worker` processes, Redis and RabbitMQ."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage
from tests.amqp_helpers import rpc, take, tap
from tests.support.daemon import DaemonProcess, env_for, wait_exit

from jlm.config import Settings
from jlm.tracing import parse_traceparent

JOB_TYPE = "ttrace"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
ROOT = Path(__file__).resolve().parent.parent


def trace_of(message: AbstractIncomingMessage) -> str | None:
    ctx = parse_traceparent((message.headers or {}).get("traceparent"))
    return ctx.trace_id if ctx is not None else None


def start_worker(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    """`jlm worker tests.worker_handlers:traced`, logging JSON lines to `log_path`."""
    argv = [sys.executable, "-m", "jlm", "worker", "tests.worker_handlers:traced"]
    env = env_for(settings, JLM_LOG_FORMAT="json", JLM_WORKER_METRICS_ADDR="127.0.0.1:0")
    with log_path.open("wb") as out:
        return subprocess.Popen(
            [*argv, "--job-type", JOB_TYPE], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )


def json_lines(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


@pytest.mark.timeout(120)
async def test_one_trace_from_request_to_handler_and_logs(
    settings: Settings, tmp_path: Path
) -> None:
    daemon = DaemonProcess.of(settings, tmp_path, JLM_LOG_LEVEL="DEBUG", JLM_LOG_FORMAT="json")
    worker_log = tmp_path / "worker.log"
    worker: subprocess.Popen[bytes] | None = None
    try:
        await daemon.wait_ready()
        conn = await aio_pika.connect(settings.amqp_urls[0])
        async with conn:
            ch = await conn.channel()
            replies = await ch.declare_queue("", exclusive=True, auto_delete=True)
            jobs = await tap(ch, "jlm.jobs", JOB_TYPE)
            events = await tap(ch, "jlm.events", "#")

            body = {"job_type": JOB_TYPE, "payload": {"n": 1}, "cache_prefix": "tr"}
            headers = {"traceparent": TRACEPARENT, "tracestate": "congo=t61rcWkgMzE"}
            reply = await rpc(ch, replies, "manage", body, headers)
            decision = orjson.loads(reply.body)
            assert decision["success"] is True, decision
            job_id = decision["new_job_id"]

            assert trace_of(reply) == TRACE_ID
            assert (reply.headers or {}).get("tracestate") == "congo=t61rcWkgMzE"
            (job_message,) = await take(jobs, 1)
            assert job_message.message_id == job_id
            assert trace_of(job_message) == TRACE_ID
            assert (job_message.headers or {}).get("tracestate") == "congo=t61rcWkgMzE"
            (enqueued,) = await take(events, 1)
            assert orjson.loads(enqueued.body)["type"] == "job.enqueued"
            assert trace_of(enqueued) == TRACE_ID

            worker = start_worker(settings, worker_log)
            claimed, succeeded = await take(events, 2, timeout=60)
            assert [orjson.loads(m.body)["type"] for m in (claimed, succeeded)] == [
                "job.claimed",
                "job.succeeded",
            ]
            assert trace_of(claimed) == trace_of(succeeded) == TRACE_ID

            cached = orjson.loads(
                (
                    await rpc(ch, replies, "result", {"job_type": JOB_TYPE, "cache_prefix": "tr"})
                ).body
            )
            assert cached["cached"] is True, cached
            assert cached["result"] == {
                "trace_id": TRACE_ID,
                "traceparent": TRACEPARENT,
                "current": TRACE_ID,
            }
    finally:
        if worker is not None:
            worker.terminate()
            await wait_exit(worker, 20, "worker")
        await daemon.terminate()

    # The `result` request above came without a traceparent: it has a trace of its own.
    daemon_lines = [r for r in daemon.logs() if r.get("op") == "manage"]
    assert any(r.get("job_id") == job_id for r in daemon_lines), daemon.log_text()[-2000:]
    assert all(r.get("trace_id") == TRACE_ID for r in daemon_lines)
    worker_lines = [r for r in json_lines(worker_log) if r.get("job_id") == job_id]
    assert any("started" in r["msg"] for r in worker_lines), worker_log.read_text()[-2000:]
    assert all(r.get("trace_id") == TRACE_ID for r in worker_lines)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("headers", [{}, {"traceparent": "00-not-a-trace"}])
async def test_a_request_without_a_valid_traceparent_starts_a_new_trace(
    settings: Settings, tmp_path: Path, headers: dict[str, str]
) -> None:
    daemon = DaemonProcess.of(settings, tmp_path)
    try:
        await daemon.wait_ready()
        async with await aio_pika.connect(settings.amqp_urls[0]) as conn:
            ch = await conn.channel()
            replies = await ch.declare_queue("", exclusive=True, auto_delete=True)
            jobs = await tap(ch, "jlm.jobs", JOB_TYPE)
            body = {"job_type": JOB_TYPE, "payload": {}}
            reply = await rpc(ch, replies, "manage", body, headers)
            assert orjson.loads(reply.body)["success"] is True
            (job_message,) = await take(jobs, 1)
            new_trace = trace_of(reply)
            assert new_trace is not None
            assert trace_of(job_message) == new_trace
            second = await rpc(ch, replies, "manage", body, headers)
            assert trace_of(second) not in (None, new_trace)  # each request its own trace
    finally:
        await daemon.terminate()


@pytest.mark.timeout(60)
async def test_a_rejected_request_keeps_its_trace(settings: Settings, tmp_path: Path) -> None:
    """Its error reply and its `request.rejected` event carry the request's trace."""
    daemon = DaemonProcess.of(settings, tmp_path)
    try:
        await daemon.wait_ready()
        async with await aio_pika.connect(settings.amqp_urls[0]) as conn:
            ch = await conn.channel()
            replies = await ch.declare_queue("", exclusive=True, auto_delete=True)
            events = await tap(ch, "jlm.events", "request.rejected")
            body = {"job_type": JOB_TYPE, "payload": {}, "priorty": 5}
            reply = await rpc(ch, replies, "manage", body, {"traceparent": TRACEPARENT})
            assert orjson.loads(reply.body)["error"]["code"] == "invalid_request"
            (rejected,) = await take(events, 1)
            assert trace_of(reply) == trace_of(rejected) == TRACE_ID
    finally:
        await daemon.terminate()
