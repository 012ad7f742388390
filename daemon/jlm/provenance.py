"""Provenance events: one per decision, published to `jlm.events` and kept in `jlm.provenance`."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jlm import __version__
from jlm.facts import ManageFacts
from jlm.protocol import ManageRequest, iso

AGENT = {"id": "job-lifecycle-manager", "version": __version__}
# The event of a manage decision; a scheduled job's `job.enqueued` comes when it is published.
_DECISION_EVENTS = {"enqueued": "job.enqueued", "scheduled": "job.scheduled"}


@dataclass(frozen=True, slots=True)
class Event:
    """One event; `type` is also its routing key on `jlm.events`."""

    provenance_id: str
    type: str
    status: str
    at: str
    actor: str | None
    request_id: str | None
    job_id: str | None
    scope: dict[str, str] | None
    input: Any
    output: Any

    def body(self) -> dict[str, Any]:
        return {
            "provenance_id": self.provenance_id,
            "type": self.type,
            "status": self.status,
            "at": self.at,
            "agent": AGENT,
            "actor": self.actor,
            "request_id": self.request_id,
            "job_id": self.job_id,
            "scope": self.scope,
            "metadata": {"input": self.input, "output": self.output},
        }


def new_id() -> str:
    return str(uuid.uuid4())


def derived_id(provenance_id: str, kind: str) -> str:
    """A stable id for a secondary event of one decision, so a replay republishes the same ids."""
    return str(uuid.uuid5(uuid.UUID(provenance_id), kind))


def scope_of(cache_prefix: str | None, job_type: str | None) -> dict[str, str] | None:
    if cache_prefix is None or job_type is None:
        return None
    return {"cache_prefix": cache_prefix, "job_type": job_type}


def manage_events(
    f: ManageFacts,
    *,
    actor: str | None,
    request_id: str,
    req: ManageRequest,
    request_input: dict[str, Any],
    reply: dict[str, Any],
) -> list[Event]:
    """The events of one manage decision: `job.superseded` (if it superseded a job), then
    `job.enqueued`, `job.scheduled` or `job.deduplicated`."""
    scope = scope_of(req.cache_prefix, req.job_type)
    events = []
    if f.superseded:
        events.append(
            Event(
                derived_id(f.provenance_id, "job.superseded"),
                "job.superseded",
                "cancelled" if f.stale_cancelled or f.running_cancelled else "running",
                f.at,
                actor,
                request_id,
                f.previous_job_id,
                scope,
                {"superseded_by": f.job_id, "cancel_running": req.cancel_running},
                {"previous_state": f.previous_state, "cache_invalidated": f.cache_invalidated},
            )
        )
    events.append(
        Event(
            f.provenance_id,
            _DECISION_EVENTS.get(f.decision, "job.deduplicated"),
            f.state,
            f.at,
            actor,
            request_id,
            f.job_id,
            scope,
            request_input,
            {**reply, "reason": f.why},
        )
    )
    return events


def rejected_event(
    op: str, reply: dict[str, Any], actor: str | None, request_id: str, body_size: int
) -> Event:
    """The `request.rejected` event of a request that can never succeed."""
    return Event(
        new_id(),
        "request.rejected",
        "rejected",
        iso(datetime.now(UTC)),
        actor,
        request_id,
        None,
        None,
        {"operation": op[:128], "body_bytes": body_size},
        reply,
    )
