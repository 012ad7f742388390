"""What a worker handles: the job a handler sees, the job message, one claimed run, the handler."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Literal

import orjson
from typing_extensions import TypeVar

from jlm.keys import tag_of_job
from jlm.protocol import JobMessage, iso
from jlm.provenance import Event, new_id, scope_of
from jlm.tracing import parse_traceparent
from jlm.worker.store import Facts, Run

# A handler's payload type: the plain JSON object unless its job type names a pydantic model.
P = TypeVar("P", default=dict[str, Any])


@dataclass(frozen=True, slots=True)
class Job(Generic[P]):
    """The job a handler runs. `attempt` counts from 1; `payload` is the JSON object, or an
    instance of the job type's pydantic model (`App.job(..., payload=Model)`). `traceparent` is
    the W3C trace context its message carried (the enqueuing request's), None when it had none."""

    id: str
    job_type: str
    cache_prefix: str
    payload: P
    priority: int
    attempt: int
    enqueued_at: str | None = None
    traceparent: str | None = None

    @property
    def trace_id(self) -> str | None:
        """The trace this job belongs to (the request's that enqueued it)."""
        ctx = parse_traceparent(self.traceparent)
        return ctx.trace_id if ctx is not None else None

    # Set by the worker running the job: stores progress for `progress()`.
    _report: Callable[[float, str], Awaitable[bool]] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose lines carry this job's id, type and attempt (`job_extra`)."""
        return logging.LoggerAdapter(HANDLER_LOG, job_extra(self))

    async def progress(self, fraction: float, message: str = "") -> bool:
        """Report how far the job is: `fraction` from 0 to 1 and a line for people ("page 3 of
        8"). The latest is shown by `jlm status`; a `job.progress` event is published at most
        once a second. False when refused: this run no longer holds a current job (superseded,
        cancelled, or taken over) or Redis is unreachable; nothing was stored then."""
        if not 0 <= fraction <= 1:  # NaN fails too
            raise ValueError(f"progress fraction must be between 0 and 1, not {fraction!r}")
        if self._report is None:
            return False
        return await self._report(float(fraction), str(message))


Handler = Callable[[Job[Any]], Awaitable[Any]]
HANDLER_LOG = logging.getLogger("jlm.job")


def job_extra(job: Job[Any]) -> dict[str, Any]:
    """The structured fields of every log line about a job: the SDK's own and `job.log`'s."""
    return {
        "job_id": job.id,
        "job_type": job.job_type,
        "attempt": job.attempt,
        "trace_id": job.trace_id,
    }


Interruption = Literal["cancelled", "lost", "stopping"]


@dataclass(frozen=True, slots=True)
class ReceivedJob(JobMessage):
    """A message of `jlm.jobs.<job_type>` as a worker received it: the job message and its bytes
    (a retry re-publishes them unchanged)."""

    raw: bytes


def parse_job_message(body: bytes) -> ReceivedJob | None:
    """The message, or None when it is not a job message of ours (acked and skipped)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    job_id, job_type, prefix = data.get("job_id"), data.get("job_type"), data.get("cache_prefix")
    payload, priority = data.get("payload"), data.get("priority", 5)
    if not isinstance(job_id, str) or tag_of_job(job_id) is None:
        return None
    if not isinstance(job_type, str) or not isinstance(prefix, str):
        return None
    if not isinstance(payload, dict) or type(priority) is not int:
        return None
    at = data.get("enqueued_at")
    return ReceivedJob(
        job_id, job_type, prefix, payload, priority, at if isinstance(at, str) else None, body
    )


@dataclass(slots=True)
class Active:
    """One claimed run in this worker: its handler task and why it must stop, if it must."""

    job: Job[Any]
    run: Run
    reason: Interruption | None = None
    interrupted: asyncio.Event = field(default_factory=asyncio.Event)

    def interrupt(self, reason: Interruption) -> None:
        """The first reason wins: a cancellation is not turned into a release by a later stop."""
        if self.reason is None:
            self.reason = reason
            self.interrupted.set()


def now() -> str:
    return iso(datetime.now(UTC))


def worker_event(
    type_: str,
    status: str,
    job_id: str | None,
    scope: tuple[str | None, str | None],
    *,
    request_id: str | None,
    input_: Any,
    output: Any,
) -> Event:
    """An event of a worker's decision: no actor; the request id is the job's enqueuing one."""
    return Event(
        new_id(),
        type_,
        status,
        now(),
        None,
        request_id or None,
        job_id,
        scope_of(*scope),
        input_,
        output,
    )


def claimed_run(
    worker_id: str, msg: ReceivedJob, facts: Facts, *, traceparent: str | None = None
) -> tuple[Active, Event]:
    """The run a claim that answered `claimed` starts, and its job.claimed event. The job's
    names come from its record in Redis (the claim's reply), not from the message; its trace
    context from the message's headers."""
    job: Job[Any] = Job(
        id=msg.job_id,
        job_type=str(facts.get("job_type") or msg.job_type),
        cache_prefix=str(facts.get("cache_prefix") or msg.cache_prefix),
        payload=msg.payload,
        priority=int(facts.get("priority") or msg.priority),
        attempt=int(facts.get("attempt", 1)),
        enqueued_at=msg.enqueued_at,
        traceparent=traceparent,
    )
    active = Active(job, Run(job.id, worker_id, int(facts.get("claim", 0))))
    info = {
        "worker": worker_id,
        "attempt": job.attempt,
        "recovered": bool(facts.get("recovered")),
    }
    event = worker_event(
        "job.claimed",
        "running",
        job.id,
        (job.cache_prefix, job.job_type),
        request_id=facts.get("request_id"),
        input_=info,
        output={"lease_until_ms": facts.get("lease_until")},
    )
    return active, event


class HandlerImportError(Exception):
    """MODULE:FUNCTION does not name an async function."""


def load_target(target: str) -> Any:
    """Import `module:attribute` (`module` alone: its `app`); the working directory is
    importable, as `python -m` would do."""
    module_name, sep, attr = target.partition(":")
    if not sep:
        attr = "app"
    if not module_name or not attr:
        raise HandlerImportError(
            f"{target!r}: expected MODULE:APP or MODULE:FUNCTION, e.g. examples.app:app"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any error while importing user code is "cannot import"
        raise HandlerImportError(
            f"cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise HandlerImportError(f"{module_name!r} has no attribute {attr!r}") from exc
    return obj


def as_handler(obj: Any, target: str) -> Handler:
    """`obj` as a handler: an async function (or an object with an async `__call__`)."""
    call = getattr(obj, "__call__", None)  # noqa: B004 - an async __call__ counts too
    if not (inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(call)):
        raise HandlerImportError(
            f"{target!r} is neither an App nor an async function (async def handle(job))"
        )
    handler: Handler = obj
    return handler


def load_handler(target: str) -> Handler:
    """Import `module:function`, an async function."""
    return as_handler(load_target(target), target)
