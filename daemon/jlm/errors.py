"""The error hierarchy: each class decides one ack outcome and one metric `outcome`."""

from __future__ import annotations

from enum import Enum

from jlm.config import redact_url

# An error `message` is at most this many bytes of UTF-8 (replies, events, dead-letter headers).
MAX_MESSAGE_BYTES = 1024
_CUT = " [...]"


def bounded(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`text` cut to at most `limit` bytes of UTF-8, never inside a character.

    Characters UTF-8 cannot carry (lone surrogates echoed from a request) become `?`.
    """
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw.decode()
    return raw[: limit - len(_CUT)].decode("utf-8", "ignore") + _CUT


class Disposition(Enum):
    """What happens to the request message."""

    ACK = "ack"  # done, or answered with an error that retrying cannot change
    DEAD_LETTER = "dead_letter"  # can never succeed: answer, dead-letter, record, ack
    RETRY = "retry"  # a passing cause: keep the message unacked and try again


class JlmError(Exception):
    """Base of every error the daemon answers with."""

    code = "internal"
    disposition = Disposition.DEAD_LETTER
    outcome = "error"
    replies = True  # answered on the request's reply_to

    def __init__(self, message: str) -> None:
        # Replies, dead letters, events and logs carry the message: no password in any of them.
        message = redact_url(message)
        message = bounded(message)
        super().__init__(message)
        self.message = message


class Rejected(JlmError):
    """A request that can never succeed."""

    disposition = Disposition.DEAD_LETTER
    outcome = "rejected"


class InvalidRequest(Rejected):
    code = "invalid_request"


class UnknownJobType(Rejected):
    code = "unknown_job_type"


class PayloadTooLarge(Rejected):
    code = "payload_too_large"


class UnsupportedOperation(Rejected):
    code = "unsupported_operation"


class Forbidden(Rejected):
    code = "forbidden"


class ReplyToForbidden(Forbidden):
    """A `reply_to` outside the caller's grant: dead-lettered, and no reply goes to that queue."""

    replies = False


class IdempotencyConflict(Rejected):
    """The request's (actor, message_id) is bound to another request."""

    code = "idempotency_conflict"


class NotFound(JlmError):
    """The named job does not exist (or has expired): answered, not dead-lettered."""

    code = "not_found"
    disposition = Disposition.ACK
    outcome = "rejected"


class Unavailable(JlmError):
    """A dependency is down or refused the work; the request is retried, never acked."""

    code = "unavailable"
    disposition = Disposition.RETRY
    outcome = "error"

    def __init__(self, message: str, dependency: str) -> None:
        super().__init__(message)
        self.dependency = dependency


class Refused(Unavailable):
    """The broker answered and said no (login, virtual host, TLS) or is not a broker: the same
    settings will fail again. At start, the daemon and the worker exit 78 on it."""


class QueueRefused(JlmError):
    """The broker refused to declare a job type's queue (a vhost limit, a permission): answered
    `unavailable` and dead-lettered, for this request only; other job types go on."""

    code = "unavailable"
    disposition = Disposition.DEAD_LETTER
    outcome = "error"


class Internal(JlmError):
    """A defect: answered and dead-lettered so that one bad message cannot loop forever."""

    code = "internal"
