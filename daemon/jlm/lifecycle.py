"""The decisions of the five operations, free of AMQP: request in, reply + job + events out."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from jlm.config import Settings, UserGrant
from jlm.errors import Forbidden, JlmError, NotFound, ReplyToForbidden, UnknownJobType
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
from jlm.store import HISTORY_BOUND, Decision, Store, pairs_to_dict


@dataclass(frozen=True, slots=True)
class Context:
    """Who asked, and under which request id."""

    request_id: str
    idempotent: bool  # the request carried a message_id: its decision is recorded and replayed
    actor: str | None
    _: KW_ONLY
    reply_to: str | None = None
    digest: str = ""  # what the idempotency key (actor, message_id) is bound to
    # The broker session of a redelivered message ("" for a first delivery): a redelivery may
    # be the decided delivery itself, never acked, whose job and events never left.
    redelivered_in: str = ""


@dataclass(slots=True)
class Outcome:
    """Everything one request produced: the reply, and what must be confirmed before it is sent."""

    reply: dict[str, Any]
    job: JobMessage | None = None
    queue: str | None = None
    events: list[Event] = field(default_factory=list)
    replayed: bool = False
    # The request record to mark once the broker confirmed the job and events (None: no record,
    # or a replay that publishes nothing).
    record: str | None = None


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

    def authorize(
        self, ctx: Context, op: str, cache_prefix: str, job_type: str, job_id: str | None = None
    ) -> None:
        """A refusal names the caller and what it asked for: the scope it named itself, or the
        job id it named, never the scope of a job it may not see."""
        auth = self._file.auth
        if not auth.enabled:
            return
        if ctx.actor is None:
            raise Forbidden("authorisation is on: the request needs a broker-validated user_id")
        grant = auth.users.get(ctx.actor)
        if grant is None or not grant.allows(op, cache_prefix, job_type):
            if job_id is not None:
                raise Forbidden(f"user {ctx.actor!r} may not {op} job {job_id!r}")
            raise Forbidden(f"user {ctx.actor!r} may not {op} in scope {cache_prefix}/{job_type}")

    def check_job_type(self, job_type: str) -> None:
        if self._file.job_type(job_type) is None:
            raise UnknownJobType(f"job type {job_type!r} is not configured")

    def validate(self, op: str, request: Request, ctx: Context) -> None:
        """The checks that need no Redis: reply_to, clock skew, job type and scope grants
        (job-id grants come later)."""
        self.authorize_reply_to(ctx)
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

    def reply_allowed(self, ctx: Context) -> bool:
        """With authorisation on, replies go only to the queues the caller's grant names (and
        without a broker-validated caller, nowhere but the default grant's queues)."""
        auth = self._file.auth
        if not auth.enabled or not ctx.reply_to:
            return True
        grant = auth.users.get(ctx.actor) if ctx.actor is not None else None
        return (grant or UserGrant()).allows_reply_to(ctx.reply_to)

    def authorize_reply_to(self, ctx: Context) -> None:
        if not self.reply_allowed(ctx):
            raise ReplyToForbidden(
                f"user {ctx.actor!r} may not have replies sent to {ctx.reply_to!r:.200}"
            )

    # -- manage ----------------------------------------------------------------------------------

    async def manage(self, req: ManageRequest, ctx: Context) -> Outcome:
        jt = self._file.job_type(req.job_type)
        if jt is None:
            raise UnknownJobType(f"job type {req.job_type!r} is not configured")
        policy = req.policy or jt.policy
        tag = scope_tag(req.cache_prefix, req.job_type)
        job_id = new_job_id(tag)
        now = datetime.now(UTC)
        # Without requested_at the script stamps the request with the Redis server's time.
        at_us = micros(parse_time(req.requested_at)) if req.requested_at else ""
        k = self._keys
        record, binding, bind_here = await self._record_keys(tag, ctx)
        decision = await self._store.decide(
            "manage",
            [
                k.scope(tag, req.cache_prefix, req.job_type),
                k.result(tag, req.cache_prefix, req.job_type),
                record,
                k.job(job_id),
                k.history(job_id),
                binding,
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
                ctx.digest,
                bind_here,
                ctx.redelivered_in,
            ],
        )
        f = decision.facts
        enqueued = f["d"] == "enqueued"
        reply: dict[str, Any] = {
            "success": True,
            "new_job_id": f["job"],
            "stale_cancelled": bool(f.get("stale")),
            "running_cancelled": bool(f.get("rc")),  # cancel_running stopped the running job
            "cache_invalidated": bool(f.get("inv")),
            "previous_job_id": f.get("prev"),
            "provenance_id": f["pid"],
            "deduplicated": not enqueued,
            "state": f["state"],
        }
        if f.get("why") == "reuse":
            # The record names the result's job; a replay reads the result again (null once gone).
            reply["result"] = None if decision.result is None else orjson.loads(decision.result)
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
            # Job id, priority and enqueued_at as recorded; the body is the recorded one too: the
            # record is bound to the digest of exactly this parsed body.
            out.job = JobMessage(
                f["job"],
                req.job_type,
                req.cache_prefix,
                req.payload,
                int(f.get("pri", req.priority)),
                f["at"],
            )
            out.queue = self._file.queue_for(req.job_type)
        self._settle_replay(out, decision, record, ctx, job_live=decision.job_state == "pending")
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

    # -- idempotency -----------------------------------------------------------------------------

    async def _record_keys(self, tag: str, ctx: Context) -> tuple[str, str, int]:
        """The request record and binding keys of a recording script, and its `bind here` flag.

        On one Redis the script binds the idempotency key itself (one round trip). On a Redis
        Cluster the binding lives in another slot: it is bound first, in a call of its own; a
        crash before the decision is harmless, the same request passes the binding again."""
        k = self._keys
        if not ctx.idempotent:
            return k.no_request(tag), k.no_request(tag), 0
        record = k.request(tag, ctx.actor, ctx.request_id)
        binding = k.binding(ctx.actor, ctx.request_id)
        if self._settings.redis_cluster:
            await self._store.bind(binding, ctx.digest, self._file.idempotency_ttl)
            return record, k.no_request(tag), 0
        return record, binding, 1

    def _settle_replay(
        self, out: Outcome, decision: Decision, record: str, ctx: Context, *, job_live: bool
    ) -> None:
        """What a decision publishes; a replay publishes nothing unless its delivery may be the
        decided one, never acked.

        A redelivered message may be the delivery that was decided and then lost (a crash or a
        failed publish before the ack): while the record holds no mark of a confirmed publish,
        its job (if still pending) and events are published again, rebuilt from the record, by
        one delivery per broker session (the script decides which). A new delivery of a decided
        request (a publisher's retry) publishes nothing: the delivery that was decided is acked,
        or still held by a daemon, or will be redelivered."""
        if ctx.idempotent:
            out.record = record
        if not decision.replayed:
            return
        if decision.republish:
            if not job_live:
                out.job = out.queue = None
            return
        out.job = out.queue = None
        out.events = []
        out.record = None

    def published(self, out: Outcome) -> None:
        """The broker confirmed the outcome's job and events: mark its request record."""
        if out.record is not None:
            self._store.mark_published(out.record, self._file.idempotency_ttl)

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
            self.authorize(ctx, "cancel", job["cache_prefix"], job["job_type"], req.job_id)
        tag = tag_of_job(req.job_id)
        if tag is None:
            raise NotFound(f"no job {req.job_id[:80]!r}")
        k = self._keys
        record, binding, bind_here = await self._record_keys(tag, ctx)
        decision = await self._store.decide(
            "cancel",
            [k.job(req.job_id), k.history(req.job_id), record, binding],
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
                ctx.digest,
                bind_here,
                ctx.redelivered_in,
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
        self._settle_replay(out, decision, record, ctx, job_live=False)
        if f["cancelled"] and not decision.replayed:
            jt = self._m.job_type_label(f.get("job_type") or "")
            self._m.jobs_cancelled.labels(job_type=jt, reason="requested").inc()
        return out

    async def status(self, req: StatusRequest, ctx: Context) -> Outcome:
        job, history = await self._read_job(req.job_id)
        self.authorize(ctx, "status", job["cache_prefix"], job["job_type"], req.job_id)
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
        record, binding, bind_here = await self._record_keys(tag, ctx)
        decision = await self._store.decide(
            "invalidate",
            [k.result(tag, req.cache_prefix, req.job_type), record, binding],
            [
                int(ctx.idempotent),
                self._file.idempotency_ttl,
                new_id(),
                iso(datetime.now(UTC)),
                ctx.digest,
                bind_here,
                ctx.redelivered_in,
            ],
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
        self._settle_replay(out, decision, record, ctx, job_live=False)
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
