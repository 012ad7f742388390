"""What the daemon's Lua scripts return, decoded once from their short wire keys.

The wire format is the scripts' (and the request records already in Redis): a JSON object with
short keys (`d`, `job`, `prev`, `sup`, ...), documented in each script's header. Values pass
through as the script wrote them (a recorded decision replays exactly); only flags become bools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

F = TypeVar("F")


@dataclass(frozen=True, slots=True)
class Decision(Generic[F]):
    """What a recording script decided: its facts, and whether they were a replay.

    `result` is the cached result a `reuse` hit answers with (read afresh on a replay, None once
    gone). On a replay, `job_state` is the decided job's state now and `republish` tells this
    delivery to publish the decision's job and events again (see lua/record.lua)."""

    replayed: bool
    facts: F
    result: bytes | None = None
    job_state: str | None = None
    republish: bool = False


@dataclass(frozen=True, slots=True)
class ManageFacts:
    """manage.lua's facts: what became of the request and of the scope's previous job."""

    decision: str  # enqueued | deduplicated | scheduled
    job_id: str
    state: Any  # the job's state as decided (wire: state)
    previous_job_id: Any  # the scope's job before this decision, None if none (wire: prev)
    previous_state: Any  # its state before this decision (wire: prev_state)
    why: Any  # skip | reuse | stale, None on an enqueue
    stale_cancelled: bool  # a pending previous job was cancelled (wire: stale)
    superseded: bool  # the previous job was superseded (wire: sup)
    running_cancelled: bool  # cancel_running stopped the running previous job (wire: rc)
    cache_invalidated: bool  # (wire: inv)
    at: Any  # the decision's time, RFC 3339
    priority: int | None  # as recorded (wire: pri); None in a record without it
    provenance_id: Any  # the decision's event id (wire: pid)
    due_ms: int | None = None  # a scheduled job's due time, ms since the epoch (wire: due)
    debounced: bool = False  # a debounce restarted the window of the scope's job (wire: ext)

    @property
    def enqueued(self) -> bool:
        return self.decision == "enqueued"

    @property
    def scheduled(self) -> bool:
        return self.decision == "scheduled"

    @classmethod
    def decode(cls, f: dict[str, Any]) -> ManageFacts:
        pri = f.get("pri")
        return cls(
            decision=f["d"],
            job_id=f["job"],
            state=f["state"],
            previous_job_id=f.get("prev"),
            previous_state=f.get("prev_state"),
            why=f.get("why"),
            stale_cancelled=bool(f.get("stale")),
            superseded=bool(f.get("sup")),
            running_cancelled=bool(f.get("rc")),
            cache_invalidated=bool(f.get("inv")),
            at=f["at"],
            priority=None if pri is None else int(pri),
            provenance_id=f["pid"],
            due_ms=None if f.get("due") is None else int(f["due"]),
            debounced=bool(f.get("ext")),
        )


@dataclass(frozen=True, slots=True)
class CancelFacts:
    """cancel.lua's facts; `not_found` (wire: nf) leaves every other field unset."""

    not_found: bool
    cancelled: bool
    state: Any  # after the decision
    previous_state: Any  # (wire: prev_state)
    job_type: Any
    cache_prefix: Any
    at: Any
    provenance_id: Any  # (wire: pid)

    @classmethod
    def decode(cls, f: dict[str, Any]) -> CancelFacts:
        return cls(
            not_found=bool(f.get("nf")),
            cancelled=bool(f.get("cancelled")),
            state=f.get("state"),
            previous_state=f.get("prev_state"),
            job_type=f.get("job_type"),
            cache_prefix=f.get("cache_prefix"),
            at=f.get("at"),
            provenance_id=f.get("pid"),
        )


@dataclass(frozen=True, slots=True)
class InvalidateFacts:
    """invalidate.lua's facts."""

    cache_invalidated: bool  # a result was dropped (wire: inv)
    job_id: Any  # the job that had produced it (wire: job), None if none
    at: Any
    provenance_id: Any  # (wire: pid)

    @classmethod
    def decode(cls, f: dict[str, Any]) -> InvalidateFacts:
        return cls(
            cache_invalidated=bool(f["inv"]),
            job_id=f.get("job"),
            at=f["at"],
            provenance_id=f["pid"],
        )


@dataclass(frozen=True, slots=True)
class JobRecord:
    """status.lua: a job's fields (empty when there is no such job) and its history entries."""

    fields: dict[str, str]
    history: list[Any]


@dataclass(frozen=True, slots=True)
class CachedResult:
    """result.lua: a scope's cached result; `job_id` is None when nothing is cached."""

    job_id: str | None
    value: bytes | None
    at: str | None
