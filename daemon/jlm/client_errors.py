"""What `JobsClient` raises: one base class, `code` the contract's error code (or the client's own:
`timeout`, `job_failed`, `job_cancelled`, `result_gone`)."""

from __future__ import annotations

from typing import Any


class JobsError(Exception):
    """Every error of `JobsClient`; `code` names it, `message` says it in words."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RequestFailed(JobsError):
    """The daemon answered `success: false`; `code` is its error code."""

    code = "internal"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidRequest(RequestFailed):
    code = "invalid_request"


class UnknownJobType(RequestFailed):
    code = "unknown_job_type"


class PayloadTooLarge(RequestFailed):
    code = "payload_too_large"


class NotFound(RequestFailed):
    code = "not_found"


class Forbidden(RequestFailed):
    code = "forbidden"


class UnsupportedOperation(RequestFailed):
    code = "unsupported_operation"


class ServiceUnavailable(RequestFailed):
    """The daemon answered `unavailable` (e.g. the broker refused a job type's queue)."""

    code = "unavailable"


class InternalError(RequestFailed):
    code = "internal"


class IdempotencyConflict(RequestFailed):
    code = "idempotency_conflict"


_BY_CODE: dict[str, type[RequestFailed]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        UnknownJobType,
        PayloadTooLarge,
        NotFound,
        Forbidden,
        UnsupportedOperation,
        ServiceUnavailable,
        InternalError,
        IdempotencyConflict,
    )
}


def error_of(reply: dict[str, Any]) -> RequestFailed:
    """The exception of an error reply (`RequestFailed` itself for a code this version lacks)."""
    raw = reply.get("error")
    error: dict[str, Any] = raw if isinstance(raw, dict) else {}
    code = str(error.get("code", "internal"))
    message = str(error.get("message", "the daemon answered an error"))
    cls = _BY_CODE.get(code)
    return cls(message) if cls is not None else RequestFailed(message, code)


class BrokerUnavailable(JobsError):
    """The broker cannot be reached, or refused what the client needs (e.g. no `jlm.requests`
    exchange: no daemon ever ran on this virtual host). `refused`: the broker answered no (a
    login, a virtual host, a permission), so only a change of settings helps."""

    code = "unavailable"

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class ReplyTimeout(JobsError, TimeoutError):
    """No reply within the timeout (is a daemon consuming `jlm.requests`?)."""

    code = "timeout"


class JobTimeout(JobsError, TimeoutError):
    """The job did not finish within `result(timeout=)`."""

    code = "timeout"


class JobFailed(JobsError):
    """The job failed; `message` is its error (the handler's exception)."""

    code = "job_failed"


class JobCancelled(JobsError):
    """The job was cancelled (or superseded) before it produced a result."""

    code = "job_cancelled"


class ResultGone(JobsError):
    """The job succeeded, but its scope's cached result is no longer its own (expired, or
    replaced by a later job's)."""

    code = "result_gone"
