"""Hostile requests: a corpus, and hypothesis strategies for bodies, operations, headers and ids.

A case is what a publisher controls: the routing key (the operation), the body bytes, the headers,
the message_id and the content type. The strategies mix near-valid requests (so that some are
accepted and the rest fail one rule at a time) with raw hostility: invalid UTF-8, NaN/Infinity,
duplicate keys, deep nesting, huge numbers, the key characters `: { } * ? [ ] \\` and NUL, forged
`x-death` headers and odd message ids.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st
from pamqp import encode as amqp_encode

OPS = ["manage", "cancel", "status", "invalidate", "result"]
JOB_TYPES = ["fz.a", "fz.b"]  # the only types the fuzzed daemon accepts
KEY_CHARS = [":", "{", "}", "*", "?", "[", "]", "\\", "\x00", "\n", " ", "/", "é", "\u202e"]


class RawField:
    """A header value given as its AMQP encoding (type octet + bytes).

    For values other clients send but pamqp never writes: a 64-bit double ('d'; pamqp writes
    every float as a 32-bit 'f'), a timestamp past the year 9999.
    """

    def __init__(self, encoded: bytes) -> None:
        self.encoded = encoded

    def __repr__(self) -> str:
        return f"RawField({self.encoded!r})"


@contextmanager
def raw_fields() -> Iterator[None]:
    """Let this process's publishes carry RawField header values (the test's publisher only)."""
    original = amqp_encode.encode_table_value

    def encode(value: Any) -> bytes:
        if isinstance(value, RawField):
            return value.encoded
        return original(value)

    amqp_encode.encode_table_value = encode
    try:
        yield
    finally:
        amqp_encode.encode_table_value = original


DOUBLE_1E300 = RawField(b"d" + struct.pack(">d", 1e300))
TIMESTAMP_2_63 = RawField(b"T" + struct.pack(">Q", 2**63))


@dataclass
class Case:
    """One hostile request."""

    name: str
    op: str
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    content_type: str | None = "application/json"
    user_id: str | None = "guest"
    poison: bool = False  # a property the AMQP client cannot decode: invalid_request


def deep(levels: int) -> bytes:
    return b'{"job_type": "fz.a", "payload": ' + b'{"a":' * levels + b"1" + b"}" * levels + b"}"


def padded(size: int, job_type: str = "fz.a") -> bytes:
    """A valid manage request of exactly `size` bytes (JSON allows trailing whitespace)."""
    head = json.dumps({"job_type": job_type, "cache_prefix": "fz-big", "payload": {}}).encode()
    return head + b" " * (size - len(head))


def corpus(limit: int) -> list[Case]:
    """Hand-picked cases; `limit` is the daemon's max_request_bytes."""
    m = b'{"job_type": "fz.a", "payload": {}}'
    return [
        Case("empty", "manage", b""),
        Case("not-json", "manage", b"hello"),
        Case("bom", "manage", b"\xef\xbb\xbf" + m),
        Case("latin1", "manage", b'{"job_type": "fz.a", "payload": {"x": "\xe9"}}'),
        Case("lone-surrogate", "manage", b'{"job_type": "fz.a", "payload": {"x": "\\ud800"}}'),
        Case("overlong-utf8", "manage", b'{"job_type": "fz.a", "payload": {"x": "\xc0\xaf"}}'),
        Case("nan", "manage", b'{"job_type": "fz.a", "payload": {"x": NaN}}'),
        Case("infinity", "manage", b'{"job_type": "fz.a", "payload": {"x": -Infinity}}'),
        Case("float-overflow", "manage", b'{"job_type": "fz.a", "payload": {"x": 1e999}}'),
        Case("huge-int", "manage", b'{"job_type": "fz.a", "payload": {"x": ' + b"9" * 400 + b"}}"),
        Case("int-2^64", "manage", b'{"job_type": "fz.a", "payload": {"x": 18446744073709551616}}'),
        Case("dup-top", "manage", b'{"job_type": "fz.a", "job_type": "fz.b", "payload": {}}'),
        Case("dup-nested", "manage", b'{"job_type": "fz.a", "payload": {"a": 1, "a": 2}}'),
        Case("deep-32", "manage", deep(31)),
        Case("deep-33", "manage", deep(32)),
        Case("deep-10000", "manage", deep(10_000)),
        Case("array-top", "manage", b"[" + m + b"]"),
        Case("trailing-garbage", "manage", m + b"x"),
        Case("two-objects", "manage", m + m),
        Case("nul-in-body", "manage", m[:-1] + b"\x00}"),
        Case("nul-key", "manage", b'{"job_type": "fz.a", "payload": {"\\u0000": 1}}'),
        Case("prio-bool", "manage", b'{"job_type": "fz.a", "payload": {}, "priority": true}'),
        Case("prio-float", "manage", b'{"job_type": "fz.a", "payload": {}, "priority": 5.0}'),
        Case("extra-field", "manage", b'{"job_type": "fz.a", "payload": {}, "admin": true}'),
        Case("unknown-type", "manage", b'{"job_type": "fz.zzz", "payload": {}}'),
        Case(
            "forbidden-prefix",
            "manage",
            b'{"job_type": "fz.a", "cache_prefix": "root", "payload": {}}',
        ),
        Case("no-user", "manage", m, user_id=None),
        Case(
            "requested-at-junk",
            "manage",
            b'{"job_type": "fz.a", "payload": {}, "requested_at": "2026-13-45T99:00:00Z"}',
        ),
        Case(
            "requested-at-naive",
            "manage",
            b'{"job_type": "fz.a", "payload": {}, "requested_at": "2026-11-28T12:00:00"}',
        ),
        Case("at-limit", "manage", padded(limit)),
        Case("at-limit-minus-1", "manage", padded(limit - 1)),
        Case("over-limit-by-1", "manage", padded(limit + 1)),
        Case("over-limit-x2", "manage", padded(2 * limit)),
        Case("cancel-foreign-id", "cancel", b'{"job_id": "../../etc/passwd"}'),
        Case("cancel-braces-id", "cancel", b'{"job_id": "{0000000000}-' + b"0" * 32 + b'"}'),
        Case("status-huge-id", "status", b'{"job_id": "' + b"a" * 257 + b'"}'),
        Case("op-upper", "MANAGE", m),
        Case("op-empty", "", m),
        Case("op-glob", "#", m),
        Case("op-dots", "manage.extra", m),
        Case("op-long", "m" * 255, m),
        Case(
            "ok-manage", "manage", b'{"job_type": "fz.a", "cache_prefix": "fz-ok", "payload": {}}'
        ),
        Case(
            "forged-x-death",
            "manage",
            m,
            headers={
                "x-death": [
                    {
                        "count": 10**12,
                        "reason": "rejected",
                        "queue": "jlm.requests",
                        "exchange": "jlm.requests",
                        "routing-keys": ["manage"],
                        "time": datetime(1970, 1, 1, tzinfo=UTC),
                    }
                ],
                "x-jlm-error": "forged",
                "x-first-death-reason": "expired",
            },
        ),
        Case("x-death-garbage", "manage", b"{", headers={"x-death": "garbage"}),
        Case("x-death-ints", "manage", b"{", headers={"x-death": [1, -1, 2**62]}),
        Case("header-double-bad-body", "manage", b"{", headers={"x-price": DOUBLE_1E300}),
        Case("header-double-ok-body", "manage", m, headers={"x-price": DOUBLE_1E300}),
        Case("weird-mid-keychars", "manage", m, message_id=":{}*?[]\\\x00"),
        Case("weird-mid-long", "manage", m, message_id="x" * 255),
        Case("weird-mid-unicode", "manage", m, message_id="\u202e\U0001f600é"),
        Case("content-type-xml", "manage", m, content_type="application/xml"),
        Case(
            "poison-timestamp-2^63",
            "manage",
            b'{"job_type": "fz.a", "cache_prefix": "fz-poison", "payload": {}}',
            headers={"x-sent-at": TIMESTAMP_2_63},
            poison=True,
        ),
        Case("requested-at-9999", "manage", at(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC))),
        Case(
            "requested-at-9999-offset",
            "manage",
            b'{"job_type": "fz.a", "payload": {}, "requested_at": "9999-12-31T23:00:00-05:00"}',
        ),
        Case("requested-at-plus-60s", "manage", at(datetime.now(UTC) + timedelta(seconds=60))),
        Case(
            "echoed-huge-key",
            "manage",
            b'{"job_type": "fz.a", "payload": {}, "' + b"k" * (limit // 2) + b'": 1}',
        ),
        Case("echoed-huge-op", "x" * 255, m),
    ]


def at(when: datetime) -> bytes:
    """A valid manage request with this requested_at."""
    body = {
        "job_type": "fz.a",
        "cache_prefix": "fz-at",
        "payload": {},
        "requested_at": when.isoformat(),
    }
    return json.dumps(body).encode()


# -- strategies ------------------------------------------------------------------------------------

names = st.one_of(
    st.sampled_from([*JOB_TYPES, "fz.zzz", "job", "fz-a", ""]),
    st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,12}\Z"),
    st.text(alphabet=st.sampled_from([*KEY_CHARS, "a", "1", "."]), min_size=1, max_size=8),
    st.just("x" * 129),
)
prefixes = st.one_of(
    st.sampled_from(["fz-1", "fz-2", "fz-x", "job", "root", "fz-*", "fz-?"]),
    st.text(alphabet=st.sampled_from([*KEY_CHARS, "f", "z", "-", "1"]), min_size=1, max_size=8),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=12,
)
priorities = st.one_of(
    st.integers(min_value=-2, max_value=12), st.sampled_from([5.0, "5", True, None, 2**64])
)
times = st.one_of(
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()),
    st.datetimes().map(lambda d: d.isoformat()),
    st.text(max_size=12),
)


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    """A request object of a random operation with some fields right and some wrong."""
    op = draw(st.sampled_from(OPS))
    body: dict[str, Any] = {}
    if op == "manage":
        body["job_type"] = draw(names)
        body["payload"] = draw(
            st.one_of(st.dictionaries(st.text(max_size=5), json_values, max_size=4), json_values)
        )
        for key, strat in (
            ("cache_prefix", prefixes),
            ("priority", priorities),
            ("policy", st.sampled_from(["replace", "skip", "reuse", "newest", None, 1])),
            ("cancel_running", st.sampled_from([True, False, 0, "yes", None])),
            ("requested_at", times),
        ):
            if draw(st.booleans()):
                body[key] = draw(strat)
    elif op in ("cancel", "status"):
        body["job_id"] = draw(st.one_of(st.text(max_size=40), st.integers(), st.just("0" * 300)))
        if op == "cancel" and draw(st.booleans()):
            body["running"] = draw(st.sampled_from([True, False, "true", 1]))
    else:
        body["job_type"] = draw(names)
        if draw(st.booleans()):
            body["cache_prefix"] = draw(prefixes)
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(max_size=6))] = draw(json_values)  # an unknown field
    if draw(st.integers(0, 9)) == 0 and body:
        del body[draw(st.sampled_from(sorted(body)))]  # a missing field
    return {"op": op, "body": body}


def mangle(raw: bytes, how: str, at: int) -> bytes:
    """Break a valid encoding in one of the ways strict JSON forbids."""
    at = at % (len(raw) + 1)
    if how == "utf8":
        return raw[:at] + b"\xff\xfe" + raw[at:]
    if how == "nan":
        return raw.replace(b"}", b', "n": NaN}', 1)
    if how == "inf":
        return raw.replace(b"}", b', "n": Infinity}', 1)
    if how == "dup":
        return raw.replace(b"{", b'{"payload": {}, ', 1)
    if how == "truncate":
        return raw[:at]
    if how == "nul":
        return raw[:at] + b"\x00" + raw[at:]
    if how == "deep":
        return raw.replace(b"}", b', "d": ' + b"[" * 40 + b"]" * 40 + b"}", 1)
    if how == "bignum":
        return raw.replace(b"}", b', "b": 1' + b"0" * 30 + b"}", 1)
    return raw


header_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(
            allow_nan=False, allow_infinity=False, width=32
        ),  # pamqp writes floats as float32
        st.text(max_size=20),
        st.binary(max_size=20).map(bytearray),
        st.datetimes(
            min_value=datetime(1970, 1, 2), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
        ).map(lambda d: d.replace(microsecond=0)),
        st.decimals(
            allow_nan=False,
            allow_infinity=False,
            places=2,
            min_value=Decimal(-1000),
            max_value=Decimal(1000),
        ),
    ),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
x_death = st.lists(
    st.fixed_dictionaries(
        {
            "count": st.integers(min_value=-(2**63), max_value=2**63 - 1),
            "reason": st.sampled_from(["rejected", "expired", "maxlen", "delivery_limit", ""]),
            "queue": st.sampled_from(["jlm.requests", "jlm.dead", ""]),
            "exchange": st.sampled_from(["jlm.requests", "", "amq.direct"]),
            "routing-keys": st.lists(st.text(max_size=10), max_size=2),
        }
    ),
    max_size=3,
)
headers = st.dictionaries(
    st.one_of(
        st.sampled_from(["x-death", "x-jlm-error", "x-first-death-queue", "x-delivery-count"]),
        st.text(min_size=1, max_size=12),
    ),
    st.one_of(x_death, header_values),
    max_size=4,
)
message_ids = st.one_of(
    st.none(),
    st.text(alphabet=st.sampled_from([*KEY_CHARS, "a", "0", "-"]), max_size=30),
    st.text(max_size=30),
)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """One hostile case: a near-valid request, perhaps mangled, with odd headers and ids."""
    req = draw(near_valid())
    op = req["op"]
    if draw(st.integers(0, 19)) == 0:
        op = draw(st.text(max_size=20).filter(lambda s: len(s.encode()) <= 255))
    try:
        raw = json.dumps(req["body"]).encode()
    except (TypeError, ValueError):
        raw = b"{"
    if draw(st.booleans()):
        raw = mangle(
            raw,
            draw(
                st.sampled_from(["utf8", "nan", "inf", "dup", "truncate", "nul", "deep", "bignum"])
            ),
            draw(st.integers(0, 1000)),
        )
    return Case(
        "fuzz",
        op,
        raw,
        headers=draw(headers),
        message_id=draw(message_ids),
        content_type=draw(st.sampled_from(["application/json", None, "text/plain"])),
        user_id=draw(st.sampled_from(["guest", "guest", None])),
    )
