"""Request parsing: strict JSON, limits, schemas. Pure logic, no I/O."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jlm.errors import InvalidRequest, PayloadTooLarge, Rejected, UnsupportedOperation
from jlm.keys import JOB_ID_RE, Keys, new_job_id, scope_tag, tag_of_job
from jlm.protocol import (
    MAX_DEPTH,
    CancelRequest,
    ManageRequest,
    ScopeRequest,
    check_clock_skew,
    depth_of,
    parse_request,
)

pytestmark = pytest.mark.unit

LIMIT = 1024 * 1024


def manage(**fields: Any) -> bytes:
    body = {"job_type": "report.render", "payload": {"user": 42}} | fields
    return orjson.dumps(body)


def test_manage_defaults() -> None:
    req = parse_request("manage", manage(), LIMIT)
    assert isinstance(req, ManageRequest)
    assert (req.cache_prefix, req.priority, req.policy, req.cancel_running) == (
        "job",
        5,
        None,
        False,
    )


def test_every_operation_has_a_model() -> None:
    assert isinstance(parse_request("cancel", b'{"job_id": "x"}', LIMIT), CancelRequest)
    assert isinstance(parse_request("invalidate", b'{"job_type": "a"}', LIMIT), ScopeRequest)
    assert isinstance(parse_request("result", b'{"job_type": "a"}', LIMIT), ScopeRequest)


@pytest.mark.parametrize(
    ("op", "body", "error", "fragment"),
    [
        ("launch", manage(), UnsupportedOperation, "unknown operation"),
        ("", manage(), UnsupportedOperation, "unknown operation"),
        ("manage", b"not json", InvalidRequest, "not valid JSON"),
        ("manage", b"\xff\xfe{}", InvalidRequest, "not UTF-8"),
        ("manage", b"[1, 2]", InvalidRequest, "JSON object"),
        ("manage", b'{"job_type": "a", "payload": {"x": NaN}}', InvalidRequest, "NaN"),
        ("manage", b'{"job_type": "a", "payload": {"x": Infinity}}', InvalidRequest, "Infinity"),
        (
            "manage",
            b'{"job_type": "a", "job_type": "b", "payload": {}}',
            InvalidRequest,
            "duplicate",
        ),
        ("manage", manage(priority=0), InvalidRequest, "priority"),
        ("manage", manage(priority=11), InvalidRequest, "priority"),
        ("manage", manage(priority="5"), InvalidRequest, "priority"),
        ("manage", manage(priority=5.0), InvalidRequest, "priority"),
        ("manage", manage(priority=True), InvalidRequest, "priority"),
        ("manage", manage(policy="newest"), InvalidRequest, "policy"),
        (
            "manage",
            manage(cancel_running=1),
            InvalidRequest,
            "cancel_running: must be true or false",
        ),
        ("manage", manage(payload=[1]), InvalidRequest, "payload: must be a JSON object"),
        ("manage", manage(job_type="a:b"), InvalidRequest, "job_type"),
        ("manage", manage(job_type="a{b}"), InvalidRequest, "job_type"),
        ("manage", manage(cache_prefix="t*"), InvalidRequest, "cache_prefix"),
        ("manage", manage(cache_prefix="t?"), InvalidRequest, "cache_prefix"),
        ("manage", manage(cache_prefix="-lead"), InvalidRequest, "cache_prefix"),
        ("manage", manage(job_type="x" * 129), InvalidRequest, "job_type"),
        ("manage", manage(requested_at="yesterday"), InvalidRequest, "requested_at"),
        ("manage", manage(requested_at="2026-11-28T12:00:00"), InvalidRequest, "requested_at"),
        ("manage", manage(extra=1), InvalidRequest, "extra: is not a field"),
        ("manage", b'{"payload": {}}', InvalidRequest, "job_type: is required"),
        ("cancel", b'{"job_id": 7}', InvalidRequest, "job_id"),
        (
            "manage",
            b'{"job_type": "a", "payload": {"n": 1' + b"0" * 30 + b"}}",
            InvalidRequest,
            "faithfully",
        ),
        ("manage", b'{"job_type": "a", "payload": {"n": 1e400}}', InvalidRequest, "range"),
        ("manage", b'{"job_type": "a", "payload": {"s": "\\ud800"}}', InvalidRequest, "faithfully"),
        ("manage", b'{"job_type": "a", "payload": {"s": "\x00"}}', InvalidRequest, "JSON"),
        ("status", b"{}", InvalidRequest, "job_id"),
    ],
)
def test_rejections(op: str, body: bytes, error: type[Rejected], fragment: str) -> None:
    with pytest.raises(error) as info:
        parse_request(op, body, LIMIT)
    assert fragment in info.value.message


def test_size_limit_is_checked_before_parsing() -> None:
    body = manage(payload={"blob": "x" * 2000})
    assert parse_request("manage", body, len(body))
    with pytest.raises(PayloadTooLarge):
        parse_request("manage", body, len(body) - 1)
    with pytest.raises(PayloadTooLarge):
        parse_request("manage", b"{" * (LIMIT + 1), LIMIT)


def nested(levels: int) -> dict[str, Any]:
    """A request whose total depth is `levels` (the top-level object is depth 1)."""
    inner: Any = {}
    for _ in range(levels - 2):
        inner = {"a": inner}
    return {"job_type": "a", "payload": inner}


def test_depth_limit() -> None:
    assert depth_of(nested(MAX_DEPTH)) == MAX_DEPTH
    assert parse_request("manage", orjson.dumps(nested(MAX_DEPTH)), LIMIT)
    with pytest.raises(InvalidRequest, match="deeper"):
        parse_request("manage", orjson.dumps(nested(MAX_DEPTH + 1)), LIMIT)
    with pytest.raises(InvalidRequest):
        parse_request("manage", b'{"payload":' + b"[" * 100_000 + b"]" * 100_000 + b"}", LIMIT)


def test_requested_at_forms() -> None:
    for value in ("2026-11-28T12:00:00.123456Z", "2026-11-28T13:00:00+01:00"):
        assert parse_request("manage", manage(requested_at=value), LIMIT)


NOW = datetime(2026, 12, 2, 6, 0, tzinfo=UTC)


@given(st.integers(min_value=-(10**9), max_value=10**9), st.sampled_from([0, 60, 300]))
def test_requested_at_is_refused_beyond_the_clock_skew(offset: int, skew: int) -> None:
    at = (NOW + timedelta(seconds=offset)).isoformat()
    request = parse_request("manage", manage(requested_at=at), LIMIT)
    if offset > skew:
        with pytest.raises(InvalidRequest, match="max_clock_skew"):
            check_clock_skew(request, NOW, skew)
    else:
        check_clock_skew(request, NOW, skew)


@pytest.mark.parametrize(
    "value", ["9999-12-31T23:59:59Z", "9999-12-31T23:00:00-05:00", "0001-01-01T00:00:00+01:00"]
)
def test_requested_at_at_the_ends_of_the_calendar_is_invalid(value: str) -> None:
    def parse_and_check() -> None:
        request = parse_request("manage", manage(requested_at=value), LIMIT)
        check_clock_skew(request, NOW, 300)

    with pytest.raises(InvalidRequest, match="requested_at"):
        parse_and_check()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["manage", "cancel", "status", "x"]))
def test_arbitrary_bytes_never_crash(body: bytes, op: str) -> None:
    try:
        parse_request(op, body, LIMIT)
    except Rejected:
        pass


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=20), json_values, max_size=8))
def test_arbitrary_objects_are_accepted_or_rejected(body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    try:
        req = parse_request("manage", raw, LIMIT)
    except Rejected as exc:
        assert exc.code == "invalid_request"
    else:
        assert isinstance(req, ManageRequest)
        assert 1 <= req.priority <= 10


@settings(max_examples=300, deadline=None)
@given(
    st.from_regex(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,40}$", fullmatch=True),
    st.from_regex(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,40}$", fullmatch=True),
    st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1), max_size=3),
    st.integers(1, 10),
)
def test_valid_manage_round_trips(
    job_type: str,
    prefix: str,
    payload: dict[str, int],
    priority: int,
) -> None:
    raw = orjson.dumps(
        {
            "job_type": job_type,
            "cache_prefix": prefix,
            "payload": payload,
            "priority": priority,
        }
    )
    req = parse_request("manage", raw, LIMIT)
    assert isinstance(req, ManageRequest)
    assert (req.job_type, req.cache_prefix, req.payload, req.priority) == (
        job_type,
        prefix,
        payload,
        priority,
    )


@given(
    st.from_regex(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,40}$", fullmatch=True),
    st.from_regex(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,40}$", fullmatch=True),
)
def test_job_ids_name_their_scope_slot(prefix: str, job_type: str) -> None:
    tag = scope_tag(prefix, job_type)
    job_id = new_job_id(tag)
    assert JOB_ID_RE.match(job_id)
    assert tag_of_job(job_id) == tag
    keys = Keys("jlm")
    hash_tag = "{" + tag + "}"
    for key in (
        keys.scope(tag, prefix, job_type),
        keys.result(tag, prefix, job_type),
        keys.job(job_id),
        keys.history(job_id),
        keys.request(tag, None, "m-1"),
        keys.request(tag, "alice", "m-1"),
    ):
        assert key.split("{", 1)[1].split("}", 1)[0] == tag, key
        assert hash_tag in key


def test_foreign_job_ids_have_no_tag() -> None:
    for bad in ("", "x", "ABCDEF0123-" + "0" * 32, "0123456789-" + "0" * 31, "{a}:b"):
        assert tag_of_job(bad) is None
