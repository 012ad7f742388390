"""OpenTelemetry spans, when the optional extra is installed (`job-lifecycle-manager[otel]`).

The daemon opens a span per request (`jlm <op>`, a child of the request's `traceparent`) with
`decision` and `publish` inside it; the worker a span per job run (`jlm job <job_type>`, a child
of the job message's context) around the handler. While such a span records, the context sent
on (job message, events, reply) is the span's own; otherwise the request's passes unchanged.

Without the package, or without a configured tracer provider (the API's default does nothing),
every function here is a no-op. The provider is OpenTelemetry's global one, configured the
standard way (`OTEL_*` settings read by the SDK or `opentelemetry-instrument`; `configure()`
sets one up from them when none is), or one given to `use_provider` (tests, embedding).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any, Literal

from jlm.tracing import TraceContext

log = logging.getLogger(__name__)

try:
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
    from opentelemetry.trace.span import TraceState
except ImportError:  # the optional extra is not installed
    otel_trace = None  # type: ignore[assignment]

Kind = Literal["internal", "consumer", "producer", "client", "server"]
_provider: Any = None


def available() -> bool:
    return otel_trace is not None


def use_provider(provider: Any) -> None:
    """Spans go to `provider` (an SDK TracerProvider) instead of the global one; None: global."""
    global _provider
    _provider = provider


def configure() -> None:
    """Set up the global tracer provider from the `OTEL_*` settings, when the SDK is installed,
    `OTEL_TRACES_EXPORTER` names an exporter and no provider is set yet (e.g. by
    `opentelemetry-instrument`). `OTEL_SDK_DISABLED=true` turns it off."""
    if otel_trace is None or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    if os.environ.get("OTEL_TRACES_EXPORTER", "none").lower() == "none":
        return
    if not isinstance(otel_trace.get_tracer_provider(), otel_trace.ProxyTracerProvider):
        return  # configured already
    try:
        from opentelemetry.sdk._configuration import _OTelSDKConfigurator

        _OTelSDKConfigurator().configure()  # type: ignore[no-untyped-call]  # the SDK is untyped here
    except Exception as exc:  # an exporter missing or misconfigured must not stop the service
        log.warning("OpenTelemetry not configured: %s: %s", type(exc).__name__, exc)


_tracers: dict[int, Any] = {}
# The global provider: a real one is set once and for all (the API refuses a second), so it is
# kept once seen; while there is none, the API is asked again at most once a second (asking
# reads os.environ: a few per cent of the daemon's CPU when done per request).
_global: Any = None
_global_checked = -1.0


def _global_provider() -> Any:
    global _global, _global_checked
    if _global is not None:
        return _global
    now = time.monotonic()
    if now - _global_checked < 1.0:
        return None
    _global_checked = now
    provider = otel_trace.get_tracer_provider()
    if isinstance(provider, otel_trace.ProxyTracerProvider | otel_trace.NoOpTracerProvider):
        return None
    _global = provider
    return provider


def _tracer() -> Any:
    """The tracer of the provider in use; None when there is none that records (the API's
    default provider, before any is set), so that a span then costs nothing."""
    if otel_trace is None:
        return None
    provider = _provider if _provider is not None else _global_provider()
    if provider is None or isinstance(
        provider, otel_trace.ProxyTracerProvider | otel_trace.NoOpTracerProvider
    ):
        return None
    tracer = _tracers.get(id(provider))
    if tracer is None:
        tracer = _tracers[id(provider)] = provider.get_tracer("jlm")
    return tracer


def _parent(ctx: TraceContext) -> Any:
    state = TraceState.from_header([ctx.tracestate]) if ctx.tracestate else None
    remote = SpanContext(
        int(ctx.trace_id, 16),
        int(ctx.span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(ctx.flags, 16)),
        trace_state=state,
    )
    return otel_trace.set_span_in_context(NonRecordingSpan(remote))


def _context_of(span: Any, fallback: TraceContext | None) -> TraceContext | None:
    sc = span.get_span_context()
    if not (span.is_recording() and sc.is_valid):
        return fallback
    state = fallback.tracestate if fallback is not None else None
    return TraceContext(f"{sc.trace_id:032x}", f"{sc.span_id:016x}", f"{sc.trace_flags:02x}", state)


def span(
    name: str,
    parent: TraceContext | None = None,
    *,
    kind: Kind = "internal",
    attributes: dict[str, Any] | None = None,
) -> contextlib.AbstractContextManager[TraceContext | None]:
    """A span named `name`, a child of `parent` (None: of the current span), current inside the
    block; yields the context to send on: the span's own while it records, else `parent`."""
    tracer = _tracer()
    if tracer is None:
        return contextlib.nullcontext(parent)
    return _recording_span(tracer, name, parent, kind, attributes)


@contextlib.contextmanager
def _recording_span(
    tracer: Any,
    name: str,
    parent: TraceContext | None,
    kind: Kind,
    attributes: dict[str, Any] | None,
) -> Iterator[TraceContext | None]:
    context = _parent(parent) if parent is not None else None
    with tracer.start_as_current_span(
        name,
        context=context,
        kind=getattr(SpanKind, kind.upper()),
        attributes=attributes,
    ) as current:
        yield _context_of(current, parent)


def current() -> TraceContext | None:
    """The current span's context, if one records (a publisher's span, for the client)."""
    if otel_trace is None:
        return None
    return _context_of(otel_trace.get_current_span(), None)
