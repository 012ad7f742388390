"""W3C trace context: the traceparent parser and the log filter. Pure logic, no I/O."""

from __future__ import annotations

import logging
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jlm.tracing import (
    TraceContext,
    TraceFilter,
    continue_or_start,
    from_headers,
    new_trace,
    parse_traceparent,
    using,
)

pytestmark = pytest.mark.unit

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
_W3C = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")

hex_digits = st.sampled_from("0123456789abcdef")
trace_ids = st.text(hex_digits, min_size=32, max_size=32).filter(lambda s: set(s) != {"0"})
span_ids = st.text(hex_digits, min_size=16, max_size=16).filter(lambda s: set(s) != {"0"})
flag_values = st.text(hex_digits, min_size=2, max_size=2)


def test_the_w3c_example_parses() -> None:
    ctx = parse_traceparent(VALID, "congo=t61rcWkgMzE")
    assert ctx == TraceContext(
        "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01", "congo=t61rcWkgMzE"
    )
    assert ctx.traceparent == VALID
    assert ctx.headers() == {"traceparent": VALID, "tracestate": "congo=t61rcWkgMzE"}


@given(trace_ids, span_ids, flag_values)
def test_every_valid_version_00_round_trips(trace_id: str, span_id: str, flags: str) -> None:
    text = f"00-{trace_id}-{span_id}-{flags}"
    ctx = parse_traceparent(text)
    assert ctx is not None
    assert (ctx.trace_id, ctx.span_id, ctx.flags) == (trace_id, span_id, flags)
    assert ctx.traceparent == text
    assert parse_traceparent(text.encode()) == ctx  # AMQP may hand the header over as bytes


@given(st.one_of(st.text(max_size=80), st.binary(max_size=80), st.integers(), st.none()))
def test_any_value_is_a_context_or_none_never_an_error(value: object) -> None:
    ctx = parse_traceparent(value)
    if ctx is not None:
        assert _W3C.fullmatch(f"00-{ctx.trace_id}-{ctx.span_id}-{ctx.flags}")


@given(st.text(max_size=80))
def test_a_request_with_garbage_starts_a_new_valid_trace(value: str) -> None:
    ctx = continue_or_start({"traceparent": value})
    assert _W3C.fullmatch(ctx.traceparent)
    assert parse_traceparent(ctx.traceparent) == TraceContext(ctx.trace_id, ctx.span_id, ctx.flags)


@given(trace_ids, span_ids, st.integers(0, 54), st.sampled_from("0123456789abcdefABCDEFxyz-_ "))
def test_one_changed_character_is_valid_only_if_still_well_formed(
    trace_id: str, span_id: str, at: int, char: str
) -> None:
    text = f"00-{trace_id}-{span_id}-01"
    changed = text[:at] + char + text[at + 1 :]
    dashes_ok = all(changed[i] == "-" for i in (2, 35, 52))
    digits = changed[:2] + changed[3:35] + changed[36:52] + changed[53:]
    hex_ok = re.fullmatch(r"[0-9a-f]+", digits) is not None
    ids_ok = set(changed[3:35]) != {"0"} and set(changed[36:52]) != {"0"}
    expected_valid = dashes_ok and hex_ok and ids_ok and changed[:2] != "ff"
    assert (parse_traceparent(changed) is not None) is expected_valid


@pytest.mark.parametrize(
    "value",
    [
        "",
        VALID.upper(),  # hex must be lowercase
        "ff" + VALID[2:],  # version ff is invalid
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
        VALID + "-extra",  # version 00 has exactly four fields
        VALID[:-1],
        " " + VALID,
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",  # a later field needs a dash
    ],
)
def test_invalid_traceparents_are_ignored(value: str) -> None:
    assert parse_traceparent(value) is None


def test_a_later_version_keeps_the_four_fields_it_knows() -> None:
    ctx = parse_traceparent("cc" + VALID[2:] + "-what-comes-next")
    assert ctx is not None
    assert ctx.traceparent == VALID


def test_tracestate_goes_only_with_a_valid_traceparent() -> None:
    assert from_headers({"tracestate": "a=b"}) is None
    assert from_headers({"traceparent": "nope", "tracestate": "a=b"}) is None
    ctx = from_headers({"traceparent": VALID, "tracestate": "x" * 513})
    assert ctx is not None
    assert ctx.tracestate is None  # too long: dropped, the trace kept
    assert ctx.headers() == {"traceparent": VALID}


def test_new_traces_are_valid_and_distinct() -> None:
    seen = {new_trace().trace_id for _ in range(100)}
    assert len(seen) == 100
    child = new_trace().child()
    assert parse_traceparent(child.traceparent) is not None


def test_log_records_made_inside_a_context_carry_its_trace_id() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(TraceFilter())
    log = logging.getLogger("tests.tracing")
    log.addHandler(handler)
    log.propagate = False
    try:
        ctx = parse_traceparent(VALID)
        with using(ctx):
            log.warning("inside")
        log.warning("outside")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert getattr(records[0], "trace_id", None) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert getattr(records[1], "trace_id", None) is None
