"""OpenTelemetry (the [otel] extra): a publisher's span, the daemon's request span with its
decision and publish, and the worker's job run form one trace with the right parents."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from tests.amqp_helpers import rpc
from tests.support.daemon import DaemonProcess
from tests.support.services import start_daemon

from jlm import otel, tracing
from jlm.client import JobsClient
from jlm.config import Settings
from jlm.worker import Job, Worker

JOB_TYPE = "otl"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


async def handle(job: Job) -> dict[str, Any]:
    ctx = tracing.current()
    return {"handler_span": ctx.span_id if ctx is not None else None}


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


@pytest.mark.timeout(90)
async def test_spans_form_one_trace_from_publisher_to_job_run(
    make_settings: Callable[..., Settings],
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel.use_provider(provider)
    settings = make_settings()
    running = await start_daemon(settings)
    worker = Worker(settings, handle, JOB_TYPE)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.started.wait(), 20)
        async with JobsClient.connect(settings.amqp_urls[0]) as jobs:
            with provider.get_tracer("publisher").start_as_current_span("render report") as p:
                decision = await jobs.manage(JOB_TYPE, {"n": 1}, prefix="o")
            result = await jobs.job(decision.new_job_id).result(timeout=30)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await running.stop()
        otel.use_provider(None)

    spans = list(exporter.get_finished_spans())
    trace_id = p.get_span_context().trace_id
    publisher = one(spans, "render report")
    request = one([s for s in spans if s.context.trace_id == trace_id], "jlm manage")
    decision_span = one([s for s in spans if s.context.trace_id == trace_id], "decision")
    publish = one([s for s in spans if s.context.trace_id == trace_id], "publish")
    run = one(spans, f"jlm job {JOB_TYPE}")

    for span in (request, decision_span, publish, run):
        assert span.context.trace_id == trace_id, span.name
    assert parent_of(request) == publisher.context.span_id
    assert request.kind is SpanKind.CONSUMER
    assert parent_of(decision_span) == request.context.span_id
    assert parent_of(publish) == request.context.span_id
    assert publish.kind is SpanKind.PRODUCER
    # The job message carries the daemon's request span: the run is its child.
    assert parent_of(run) == request.context.span_id
    assert run.attributes is not None
    assert run.attributes["jlm.job_id"] == decision.new_job_id
    # Inside the handler the current context is the run's span.
    assert result == {"handler_span": f"{run.context.span_id:016x}"}


def test_without_a_provider_nothing_is_recorded_and_the_context_passes_unchanged() -> None:
    ctx = tracing.new_trace()
    with otel.span("jlm manage", ctx, kind="consumer") as sent:
        assert sent == ctx  # the API's default provider records nothing
    assert otel.current() is None


@pytest.mark.timeout(60)
async def test_the_daemon_exports_spans_configured_by_the_otel_settings(
    settings: Settings, tmp_path: Path
) -> None:
    """`OTEL_TRACES_EXPORTER=console` on a real `jlm run`: its request span, a child of the
    request's traceparent, is printed when the daemon stops."""
    daemon = DaemonProcess.of(
        settings, tmp_path, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="jlm-test"
    )
    try:
        await daemon.wait_ready()
        async with await aio_pika.connect(settings.amqp_urls[0]) as conn:
            ch = await conn.channel()
            replies = await ch.declare_queue("", exclusive=True, auto_delete=True)
            body = {"job_type": JOB_TYPE, "payload": {}}
            reply = await rpc(ch, replies, "manage", body, {"traceparent": TRACEPARENT})
        sent = tracing.from_headers(reply.headers)
    finally:
        assert await daemon.terminate() == 0
    text = daemon.log_text()
    assert '"name": "jlm manage"' in text, text[-3000:]
    assert f'"trace_id": "0x{TRACE_ID}"' in text
    assert '"parent_id": "0x00f067aa0ba902b7"' in text  # the publisher's span
    assert '"service.name": "jlm-test"' in text
    # The reply carries the daemon's own span, in the request's trace.
    assert sent is not None
    assert sent.trace_id == TRACE_ID
    assert sent.span_id != "00f067aa0ba902b7"
    assert f'"span_id": "0x{sent.span_id}"' in text
