"""W3C trace context (https://www.w3.org/TR/trace-context/) carried in AMQP headers.

A request's `traceparent` / `tracestate` headers travel onto its job message, its events and its
reply; the worker continues them around the handler. A request without a valid `traceparent`
starts a new trace: an invalid header is ignored, never an error. The context of the request or
job being handled lives in a context variable, and `TraceFilter` puts its trace id on every log
record made inside it. No I/O and no AMQP types here.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
MAX_TRACESTATE = 512  # bytes the W3C recommends a vendor propagate at least; longer is dropped

_HEX = re.compile(r"[0-9a-f]+")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One position in a trace: the trace, the span that is the parent of what follows, flags."""

    trace_id: str  # 32 lowercase hex digits, not all zero
    span_id: str  # 16 lowercase hex digits, not all zero
    flags: str = "01"  # 2 hex digits; bit 0 = sampled
    tracestate: str | None = None

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    @property
    def sampled(self) -> bool:
        return bool(int(self.flags, 16) & 1)

    def headers(self) -> dict[str, str]:
        """The AMQP headers that carry this context."""
        out = {TRACEPARENT: self.traceparent}
        if self.tracestate:
            out[TRACESTATE] = self.tracestate
        return out

    def child(self) -> TraceContext:
        """The same trace under a new span id (a span of our own)."""
        return TraceContext(self.trace_id, _span_id(), self.flags, self.tracestate)


def _hex(value: str, length: int) -> bool:
    return len(value) == length and _HEX.fullmatch(value) is not None


def _span_id() -> str:
    while (span := secrets.token_hex(8)) == _ZERO_SPAN:
        continue
    return span


def new_trace() -> TraceContext:
    """A new trace, sampled (a request that came without a trace context starts one)."""
    while (trace := secrets.token_hex(16)) == _ZERO_TRACE:
        continue
    return TraceContext(trace, _span_id(), "01")


def _text(value: object) -> str | None:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def parse_traceparent(value: object, tracestate: object = None) -> TraceContext | None:
    """The context of a `traceparent` header (str or bytes), or None when it is not valid.

    Version 00 is exactly `00-<32 hex>-<16 hex>-<2 hex>`; a later version may append fields
    after a dash, which are ignored (W3C level 1, "versioning of traceparent"); version ff and
    all-zero ids are invalid. `tracestate` is kept only with a valid `traceparent`, when it is
    printable ASCII of at most MAX_TRACESTATE bytes.
    """
    text = _text(value)
    if text is None or len(text) < 55:
        return None
    version, trace_id, span_id, flags = text[:2], text[3:35], text[36:52], text[53:55]
    if not (_hex(version, 2) and _hex(trace_id, 32) and _hex(span_id, 16) and _hex(flags, 2)):
        return None
    if text[2] != "-" or text[35] != "-" or text[52] != "-" or version == "ff":
        return None
    if (version == "00" and len(text) != 55) or (len(text) > 55 and text[55] != "-"):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    state = _text(tracestate)
    if state is not None:
        state = state.strip()
        if not (state and len(state) <= MAX_TRACESTATE and state.isascii() and state.isprintable()):
            state = None
    return TraceContext(trace_id, span_id, flags, state)


def from_headers(headers: Mapping[str, Any] | None) -> TraceContext | None:
    """The trace context of a message's headers, or None (absent or invalid)."""
    if not headers:
        return None
    return parse_traceparent(headers.get(TRACEPARENT), headers.get(TRACESTATE))


def continue_or_start(headers: Mapping[str, Any] | None) -> TraceContext:
    """The context a message carries, or a new trace when it carries none that is valid."""
    return from_headers(headers) or new_trace()


_current: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar(
    "jlm_trace", default=None
)


def current() -> TraceContext | None:
    """The context of the request or job this task is handling, if any."""
    return _current.get()


def adopt(ctx: TraceContext | None) -> None:
    """Make `ctx` this task's context (its child tasks inherit it)."""
    _current.set(ctx)


@contextlib.contextmanager
def using(ctx: TraceContext | None) -> Iterator[TraceContext | None]:
    """`ctx` as the current context inside the block."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


class TraceFilter(logging.Filter):
    """Puts `trace_id` on a record made while a request or job is handled (unless it has one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _current.get()
        if ctx is not None and getattr(record, "trace_id", None) is None:
            record.trace_id = ctx.trace_id
        return True
