"""The decisions of the five operations, free of AMQP: request in, reply + job + events out."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from jlm.config import Settings
from jlm.errors import Forbidden, JlmError, NotFound, UnknownJobType
from jlm.keys import Keys, new_job_id, scope_tag, tag_of_job
from jlm.metrics import Metrics
from jlm.protocol import (
    CancelRequest,
    JobMessage,
    ManageRequest,
    Request,
    ScopeRequest,
    StatusRequest,
    check_clock_skew,
    error_reply,
    iso,
    micros,
    parse_time,
)
from jlm.provenance import Event, derived_id, new_id, scope_of
from jlm.store import HISTORY_BOUND, Store, pairs_to_dict


@dataclass(frozen=True, slots=True)
class Context:
    """Who asked, and under which request id."""

    request_id: str
    idempotent: bool  # the request carried a message_id: its decision is recorded and replayed
    actor: str | None


@dataclass(slots=True)
class Outcome:
    """Everything one request produced: the reply, and what must be confirmed before it is sent."""

    reply: dict[str, Any]
    job: JobMessage | None = None
    queue: str | None = None
    events: list[Event] = field(default_factory=list)
    replayed: bool = False


class Lifecycle:
    """enqueue → deduplicate → track → cancel → invalidate, as calls of the store."""

    def __init__(self, store: Store, settings: Settings, metrics: Metrics) -> None:
        self._store = store
        self._settings = settings
        self._file = settings.file
        self._keys: Keys = store.keys
        self._m = metrics
        self._channel = self._keys.cancel_channel

    async def handle(self, op: str, request: Request, ctx: Context) -> Outcome:
        if isinstance(request, ManageRequest):
            return await self.manage(request, ctx)
        if isinstance(request, CancelRequest):
            return await self.cancel(request, ctx)
        if isinstance(request, StatusRequest):
            return await self.status(request, ctx)
        if op == "invalidate":
            return await self.invalidate(request, ctx)
        return await self.result(request, ctx)

    # -- authorisation ---------------------------------------------------------------------------

    def authorize(self, ctx: Context, op: str, cache_prefix: str, job_type: str) -> None:
        auth = self._file.auth
        if not auth.enabled:
            return
        if ctx.actor is None:
            raise Forbidden("authorisation is on: the request needs a broker-validated user_id")
        grant = auth.users.get(ctx.actor)
        if grant is None or not grant.allows(op, cache_prefix, job_type):
            raise Forbidden(f"user {ctx.actor!r} may not {op} in scope {cache_prefix}/{job_type}")

    def check_job_type(self, job_type: str) -> None:
        if self._file.job_type(job_type) is None:
            raise UnknownJobType(f"job type {job_type!r} is not configured")

    def validate(self, op: str, request: Request, ctx: Context) -> None:
        """The checks that need no Redis: clock skew, job type and scope grants (job-id grants
        come later)."""
        check_clock_skew(request, datetime.now(UTC), self._file.max_clock_skew)
        if isinstance(request, ManageRequest | ScopeRequest):
            self.check_job_type(request.job_type)
            self.authorize(ctx, op, request.cache_prefix, request.job_type)
        elif self._file.auth.enabled:
            # By job id: the caller must hold the operation before any Redis read (no oracle of
            # which job ids exist); the job's scope is checked once the job is read.
            if ctx.actor is None:
                raise Forbidden("authorisation is on: the request needs a broker-validated user_id")
            grant = self._file.auth.users.get(ctx.actor)
            if grant is None or not grant.allows(op, None, None):
                raise Forbidden(f"user {ctx.actor!r} may not {op}")

    # -- manage ----------------------------------------------------------------------------------

    async def manage(self, req: ManageRequest, ctx: Context) -> Outcome:
        jt = self._file.job_type(req.job_type)
        if jt is None:
            raise UnknownJobType(f"job type {req.job_type!r} is not configured")
        policy = req.policy or jt.policy
        tag = scope_tag(req.cache_prefix, req.job_type)
        job_id = new_job_id(tag)
        now = datetime.now(UTC)
        at_us = micros(parse_time(req.requested_at)) if req.requested_at else micros(now)
        k = self._keys
        decision = await self._store.decide(
            "manage",
            [
                k.scope(tag, req.cache_prefix, req.job_type),
                k.result(tag, req.cache_prefix, req.job_type),
                k.request(tag, ctx.request_id) if ctx.idempotent else k.no_request(tag),
                k.job(job_id),
                k.history(job_id),
            ],
            [
                policy,
                job_id,
                iso(now),
                at_us,
                int(req.cancel_running),
                int(ctx.idempotent),
                self._file.idempotency_ttl,
                self._file.job_ttl,
                k.job_prefix(tag),
                req.job_type,
                req.cache_prefix,
                req.priority,
                ctx.request_id,
                new_id(),
                self._channel,
                HISTORY_BOUND,
            ],
        )
        f = decision.facts
        enqueued = f["d"] == "enqueued"
        reply: dict[str, Any] = {
            "success": True,
            "new_job_id": f["job"],
            "stale_cancelled": bool(f.get("stale")),
            "cache_invalidated": bool(f.get("inv")),
            "previous_job_id": f.get("prev"),
            "provenance_id": f["pid"],
            "deduplicated": not enqueued,
            "state": f["state"],
        }
        if "result" in f:
            reply["result"] = orjson.loads(f["result"])
        out = Outcome(reply, replayed=decision.replayed)
        scope = scope_of(req.cache_prefix, req.job_type)
        request_input = req.model_dump()
        main = Event(
            f["pid"],
            "job.enqueued" if enqueued else "job.deduplicated",
            f["state"],
            f["at"],
            ctx.actor,
            ctx.request_id,
            f["job"],
            scope,
            {**request_input, "policy": policy},
            {**reply, "reason": f.get("why")},
        )
        if f.get("sup"):
            out.events.append(
                Event(
                    derived_id(f["pid"], "job.superseded"),
                    "job.superseded",
                    "cancelled" if f.get("stale") or f.get("rc") else "running",
                    f["at"],
                    ctx.actor,
                    ctx.request_id,
                    f["prev"],
                    scope,
                    {"superseded_by": f["job"], "cancel_running": req.cancel_running},
                    {
                        "previous_state": f.get("prev_state"),
                        "cache_invalidated": bool(f.get("inv")),
                    },
                )
            )
        out.events.append(main)
        if enqueued:
            out.job = JobMessage(
                f["job"],
                req.job_type,
                req.cache_prefix,
                req.payload,
                req.priority,
                f["at"],
            )
            out.queue = self._file.queue_for(req.job_type)
        if not decision.replayed:
            self._count_manage(req, policy, f)
        return out

    def _count_manage(self, req: ManageRequest, policy: str, f: dict[str, Any]) -> None:
        m = self._m
        jt = m.job_type_label(req.job_type)
        if f["d"] == "enqueued":
            m.child(m.jobs_enqueued, jt, str(req.priority)).inc()
        else:
            m.child(m.jobs_deduplicated, jt, policy).inc()
        if f.get("sup"):
            m.child(m.jobs_superseded, jt).inc()
        if f.get("stale") or f.get("rc"):
            m.child(m.jobs_cancelled, jt, "superseded").inc()
        if f.get("inv"):
            m.child(m.cache_invalidations, jt).inc()

    # -- by job id -------------------------------------------------------------------------------

    async def _read_job(self, job_id: str) -> tuple[dict[str, str], list[Any]]:
        if tag_of_job(job_id) is None:
            raise NotFound(f"no job {job_id[:80]!r}")
        fields, history = await self._store.run(
            "status",
            [self._keys.job(job_id), self._keys.history(job_id)],
            [],
        )
        job = pairs_to_dict(fields)
        if not job:
            raise NotFound(f"no job {job_id!r} (unknown, or expired)")
        return job, history

    async def cancel(self, req: CancelRequest, ctx: Context) -> Outcome:
        if self._file.auth.enabled:
            job, _ = await self._read_job(req.job_id)
            self.authorize(ctx, "cancel", job["cache_prefix"], job["job_type"])
        tag = tag_of_job(req.job_id)
        if tag is None:
            raise NotFound(f"no job {req.job_id[:80]!r}")
        k = self._keys
        decision = await self._store.decide(
            "cancel",
            [
                k.job(req.job_id),
                k.history(req.job_id),
                k.request(tag, ctx.request_id) if ctx.idempotent else k.no_request(tag),
            ],
            [
                int(req.running),
                iso(datetime.now(UTC)),
                int(ctx.idempotent),
                self._file.idempotency_ttl,
                new_id(),
                self._channel,
                req.job_id,
                HISTORY_BOUND,
                self._file.job_ttl,
            ],
        )
        f = decision.facts
        if f.get("nf"):
            raise NotFound(f"no job {req.job_id!r} (unknown, or expired)")
        reply = {
            "success": True,
            "job_id": req.job_id,
            "cancelled": bool(f["cancelled"]),
            "state": f["state"],
            "provenance_id": f["pid"],
        }
        out = Outcome(reply, replayed=decision.replayed)
        out.events.append(
            Event(
                f["pid"],
                "job.cancelled" if f["cancelled"] else "job.cancel_declined",
                f["state"],
                f["at"],
                ctx.actor,
                ctx.request_id,
                req.job_id,
                scope_of(f.get("cache_prefix"), f.get("job_type")),
                req.model_dump(),
                {**reply, "previous_state": f.get("prev_state")},
            )
        )
        if f["cancelled"] and not decision.replayed:
            jt = self._m.job_type_label(f.get("job_type") or "")
            self._m.jobs_cancelled.labels(job_type=jt, reason="requested").inc()
        return out

    async def status(self, req: StatusRequest, ctx: Context) -> Outcome:
        job, history = await self._read_job(req.job_id)
        self.authorize(ctx, "status", job["cache_prefix"], job["job_type"])
        reply = {
            "success": True,
            "job_id": req.job_id,
            "state": job.get("state"),
            "job_type": job.get("job_type"),
            "cache_prefix": job.get("cache_prefix"),
            "priority": int(job.get("priority", "5")),
            "created_at": job.get("created_at"),
            "updated_at": job.get("updated_at"),
            "superseded_by": job.get("superseded_by"),
            "attempt": int(job.get("attempt", "0")),
            "history": [orjson.loads(h) for h in history],
        }
        if job.get("error"):
            reply["error"] = job["error"]
        return Outcome(reply)

    # -- by scope --------------------------------------------------------------------------------

    async def invalidate(self, req: ScopeRequest, ctx: Context) -> Outcome:
        tag = scope_tag(req.cache_prefix, req.job_type)
        k = self._keys
        decision = await self._store.decide(
            "invalidate",
            [
                k.result(tag, req.cache_prefix, req.job_type),
                k.request(tag, ctx.request_id) if ctx.idempotent else k.no_request(tag),
            ],
            [int(ctx.idempotent), self._file.idempotency_ttl, new_id(), iso(datetime.now(UTC))],
        )
        f = decision.facts
        reply = {"success": True, "cache_invalidated": bool(f["inv"]), "provenance_id": f["pid"]}
        out = Outcome(reply, replayed=decision.replayed)
        out.events.append(
            Event(
                f["pid"],
                "cache.invalidated",
                "invalidated" if f["inv"] else "unchanged",
                f["at"],
                ctx.actor,
                ctx.request_id,
                f.get("job"),
                scope_of(req.cache_prefix, req.job_type),
                req.model_dump(),
                reply,
            )
        )
        if f["inv"] and not decision.replayed:
            self._m.cache_invalidations.labels(job_type=self._m.job_type_label(req.job_type)).inc()
        return out

    async def result(self, req: ScopeRequest, ctx: Context) -> Outcome:
        tag = scope_tag(req.cache_prefix, req.job_type)
        job_id, value, at = await self._store.run(
            "result",
            [self._keys.result(tag, req.cache_prefix, req.job_type)],
            [],
        )
        cached = job_id is not None
        reply: dict[str, Any] = {
            "success": True,
            "cached": cached,
            "job_id": job_id.decode() if cached else None,
            "result": orjson.loads(value) if cached else None,
        }
        if cached and at is not None:
            reply["cached_at"] = at.decode()
        return Outcome(reply)

    # -- rejections ------------------------------------------------------------------------------

    def rejected(self, op: str, error: JlmError, ctx: Context, body_size: int) -> Outcome:
        """The reply and `request.rejected` event of a request that can never succeed."""
        reply = error_reply(error.code, error.message)
        event = Event(
            new_id(),
            "request.rejected",
            "rejected",
            iso(datetime.now(UTC)),
            ctx.actor,
            ctx.request_id,
            None,
            None,
            {"operation": op[:128], "body_bytes": body_size},
            reply,
        )
        return Outcome(reply, events=[event])
