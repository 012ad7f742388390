"""Wire models: request parsing (strict JSON, limits, schemas), replies and job messages."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from jlm.config import NAME_RE, OPERATIONS
from jlm.errors import InvalidRequest, PayloadTooLarge, UnsupportedOperation

MAX_DEPTH = 32
MAX_ID_LEN = 256

Name = Annotated[str, StringConstraints(strict=True, pattern=NAME_RE.pattern)]
JobId = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=MAX_ID_LEN)]
Priority = Annotated[int, Field(strict=True, ge=1, le=10)]
# Milliseconds of a debounce window or its bound: up to a day.
WaitMs = Annotated[int, Field(strict=True, ge=1, le=86_400_000)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ManageRequest(_Request):
    job_type: Name
    payload: dict[str, Any]
    cache_prefix: Name = "job"
    priority: Priority = 5
    policy: Literal["replace", "skip", "reuse", "debounce"] | None = None
    cancel_running: bool = False
    requested_at: str | None = None
    debounce_ms: WaitMs | None = None  # policy debounce: the quiet time before publishing
    max_wait_ms: WaitMs | None = None  # policy debounce: the longest wait from the first request
    not_before: str | None = None  # RFC 3339: the job is published at that time, not before


class CancelRequest(_Request):
    job_id: JobId
    running: bool = False


class StatusRequest(_Request):
    job_id: JobId


class ScopeRequest(_Request):
    job_type: Name
    cache_prefix: Name = "job"


Request = ManageRequest | CancelRequest | StatusRequest | ScopeRequest

_MODELS: dict[str, type[_Request]] = {
    "manage": ManageRequest,
    "cancel": CancelRequest,
    "status": StatusRequest,
    "invalidate": ScopeRequest,
    "result": ScopeRequest,
}
assert tuple(_MODELS) == OPERATIONS


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in strict JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key[:64]!r}")
            seen.add(key)
    return obj


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates,
    parse_constant=_no_constant,
    parse_float=_finite,
)


def depth_of(value: Any) -> int:
    """Nesting depth: a scalar is 0, the top-level object is 1. Iterative, so never recursive."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def decode_json(body: bytes, max_bytes: int) -> dict[str, Any]:
    """Strict JSON of one object: UTF-8, no NaN/Infinity, no duplicate keys, depth <= 32."""
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"request body is {len(body)} bytes; the limit is {max_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"body is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    try:
        value = _DECODER.decode(text)
    except RecursionError as exc:
        raise InvalidRequest(f"JSON nesting is deeper than {MAX_DEPTH}") from exc
    except ValueError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidRequest("body must be a JSON object")
    if depth_of(value) > MAX_DEPTH:
        raise InvalidRequest(f"JSON nesting is deeper than {MAX_DEPTH}")
    try:
        # What we accept we must be able to publish again: integers beyond 64 bits and lone
        # surrogates ("\ud800") parse, but have no faithful JSON encoding downstream.
        orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidRequest(f"body holds a value JSON cannot carry faithfully: {exc}") from exc
    return value


def parse_time(value: str, name: str = "requested_at") -> datetime:
    """RFC 3339 with an explicit offset, returned in UTC; `name` is the field, for the error."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidRequest(f"{name}: not an RFC 3339 time: {value[:64]!r}") from exc
    if parsed.tzinfo is None or "T" not in value.upper():
        raise InvalidRequest(f"{name}: an RFC 3339 time with date, time and offset")
    try:
        return parsed.astimezone(UTC)
    except OverflowError as exc:  # e.g. 9999-12-31T23:00:00-05:00 is in the year 10000 UTC
        raise InvalidRequest(f"{name}: out of range: {value[:64]!r}") from exc


def check_clock_skew(request: Request, now: datetime, max_skew: float) -> None:
    """A `requested_at` more than `max_skew` seconds ahead of `now` is refused.

    Such a time would make every later request of its scope "stale" until that time comes.
    """
    if isinstance(request, ManageRequest) and request.requested_at is not None:
        at = parse_time(request.requested_at)
        if at - now > timedelta(seconds=max_skew):
            raise InvalidRequest(
                f"requested_at {request.requested_at[:64]!r} is more than {max_skew:g} s "
                "ahead of the daemon's clock (max_clock_skew)"
            )


# Validation messages in the words of JSON, not of Python ("a valid dictionary").
_JSON_WORDS = {
    "dict_type": "must be a JSON object",
    "model_type": "must be a JSON object",
    "list_type": "must be a JSON array",
    "string_type": "must be a JSON string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "missing": "is required",
    "extra_forbidden": "is not a field of this request",
}


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{loc}: {_JSON_WORDS.get(err['type'], err['msg'])}")
    return "; ".join(parts)


def parse_request(op: str, body: bytes, max_bytes: int) -> Request:
    """Validate a request of operation `op`; raise a Rejected subclass on any fault."""
    model = _MODELS.get(op)
    if model is None:
        raise UnsupportedOperation(
            f"unknown operation {op[:64]!r}; use one of {', '.join(OPERATIONS)}"
        )
    data = decode_json(body, max_bytes)
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(_format_validation(exc)) from exc
    if isinstance(request, ManageRequest) and request.requested_at is not None:
        parse_time(request.requested_at)
    if isinstance(request, ManageRequest) and request.not_before is not None:
        parse_time(request.not_before, "not_before")
    return request  # type: ignore[return-value]


def request_digest(op: str, actor: str | None, body: bytes) -> str:
    """The digest an idempotency key is bound to: operation, actor and the parsed body.

    Equal parsed JSON gives an equal digest whatever its key order and white space; numbers keep
    their parsed type (1 and 1.0 differ). Call it only on a body that `parse_request` accepted."""
    value = _DECODER.decode(body.decode("utf-8"))  # the parser that accepted it
    canonical = orjson.dumps([op, actor, value], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=16).hexdigest()


def iso(ts: datetime) -> str:
    """RFC 3339 UTC with microseconds and a Z."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def micros(ts: datetime) -> int:
    return int(ts.timestamp()) * 1_000_000 + ts.microsecond


def error_reply(code: str, message: str) -> dict[str, Any]:
    return {"success": False, "error": {"code": code, "message": message}}


@dataclass(frozen=True, slots=True)
class JobMessage:
    """What goes to `jlm.jobs.<job_type>` (the daemon always sets `enqueued_at`; a worker reading
    a message from another publisher may find none)."""

    job_id: str
    job_type: str
    cache_prefix: str
    payload: dict[str, Any]
    priority: int
    enqueued_at: str | None

    def body(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "job_type": self.job_type,
            "cache_prefix": self.cache_prefix,
            "payload": self.payload,
            "priority": self.priority,
            "enqueued_at": self.enqueued_at,
        }


OperationName = Literal["manage", "cancel", "status", "invalidate", "result"]
