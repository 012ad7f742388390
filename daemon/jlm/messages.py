"""The messages the daemon and the workers send, as pydantic models: the replies, the job message
and the event. With the request models of `jlm.protocol` they are the machine-readable contract:
`jlm.schemas` writes their JSON Schemas to docs/schemas/, and `jlm.client` reads replies with them.

Replies and events allow fields this version does not know (the contract may add fields); the
requests, in `jlm.protocol`, forbid them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

ErrorCode = Literal[
    "invalid_request",
    "unknown_job_type",
    "payload_too_large",
    "not_found",
    "forbidden",
    "unsupported_operation",
    "unavailable",
    "internal",
    "idempotency_conflict",
]
ERROR_CODES: tuple[str, ...] = get_args(ErrorCode)

Time = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
JobState = Annotated[
    str,
    Field(
        description="scheduled, pending, running, succeeded, failed or cancelled (later versions "
        "may add states)",
        examples=["scheduled", "pending", "running", "succeeded", "failed", "cancelled"],
    ),
]


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Decision(_Message):
    """The reply to `manage`: the job the caller should now track, and what the decision did."""

    success: Literal[True]
    new_job_id: str
    stale_cancelled: bool
    running_cancelled: bool = False
    cache_invalidated: bool
    previous_job_id: str | None
    provenance_id: str
    deduplicated: bool
    state: JobState
    result: Any = Field(
        default=None, description="with policy reuse and a cached result: that result"
    )
    due_at: Time | None = Field(
        default=None, description="a scheduled job (debounce, not_before): when it is published"
    )


class CancelReply(_Message):
    """The reply to `cancel`."""

    success: Literal[True]
    job_id: str
    cancelled: bool
    state: JobState
    provenance_id: str


class HistoryEntry(_Message):
    state: JobState
    at: Time
    reason: str | None = None


class Progress(_Message):
    """How far a running job is, as its handler last reported it."""

    fraction: float = Field(ge=0, le=1)
    message: str = ""
    at: Time


class JobStatus(_Message):
    """The reply to `status`: a job's state and history."""

    success: Literal[True]
    job_id: str
    state: JobState
    job_type: str
    cache_prefix: str
    priority: int
    created_at: Time | None
    updated_at: Time | None
    superseded_by: str | None
    attempt: int = 0
    history: list[HistoryEntry]
    error: str | None = Field(default=None, description="why a failed job failed")
    progress: Progress | None = Field(
        default=None, description="the latest progress its handler reported, once it has"
    )
    due_at: Time | None = Field(
        default=None, description="a job that was scheduled: when it is (was) due to be published"
    )


class InvalidateReply(_Message):
    """The reply to `invalidate`."""

    success: Literal[True]
    cache_invalidated: bool
    provenance_id: str


class CachedResult(_Message):
    """The reply to `result`: the scope's cached result, if any."""

    success: Literal[True]
    cached: bool
    job_id: str | None
    result: Any = None
    cached_at: Time | None = None


class ErrorDetail(_Message):
    code: ErrorCode
    message: Annotated[str, Field(max_length=1024)]


class ErrorReply(_Message):
    """The reply to any request that failed."""

    success: Literal[False]
    error: ErrorDetail


class JobMessageModel(_Message):
    """A message of `jlm.jobs.<job_type>`: persistent, `priority` set, `message_id` = job id."""

    job_id: str
    job_type: str
    cache_prefix: str
    payload: dict[str, Any]
    priority: Annotated[int, Field(ge=1, le=10)]
    enqueued_at: Time


class Agent(_Message):
    id: Literal["job-lifecycle-manager"]
    version: str


class Scope(_Message):
    cache_prefix: str
    job_type: str


class Metadata(_Message):
    input: Any = None
    output: Any = None


class EventModel(_Message):
    """One lifecycle event on `jlm.events` (and `jlm.provenance`); `type` is its routing key."""

    provenance_id: str
    type: Annotated[
        str,
        Field(
            pattern=r"^(job|cache|request)\.[a-z_]+$",
            examples=[
                "job.scheduled",
                "job.enqueued",
                "job.superseded",
                "job.deduplicated",
                "job.cancelled",
                "job.cancel_declined",
                "job.claimed",
                "job.progress",
                "job.succeeded",
                "job.failed",
                "job.released",
                "job.skipped",
                "cache.invalidated",
                "request.rejected",
            ],
        ),
    ]
    status: str
    at: Time
    agent: Agent
    actor: str | None
    request_id: str | None
    job_id: str | None
    scope: Scope | None
    metadata: Metadata


REPLIES: dict[str, type[_Message]] = {
    "manage": Decision,
    "cancel": CancelReply,
    "status": JobStatus,
    "invalidate": InvalidateReply,
    "result": CachedResult,
}
