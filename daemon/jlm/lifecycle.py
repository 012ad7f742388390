"""The decisions of the five operations, free of AMQP: request in, reply + job + events out."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from jlm.config import Settings, UserGrant
from jlm.due import DueSets, ms_iso, schedule_arg, status_reply
from jlm.errors import Forbidden, JlmError, NotFound, ReplyToForbidden, UnknownJobType
from jlm.facts import Decision, ManageFacts
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
from jlm.provenance import Event, manage_events, new_id, rejected_event, scope_of
from jlm.store import HISTORY_BOUND, Store


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


def manage_reply(f: ManageFacts, result: bytes | None) -> dict[str, Any]:
    """The reply to a `manage` decided (or replayed) as `f`; `result` is a `reuse` hit's."""
    reply: dict[str, Any] = {
        "success": True,
        "new_job_id": f.job_id,
        "stale_cancelled": f.stale_cancelled,
        "running_cancelled": f.running_cancelled,  # cancel_running stopped the running job
        "cache_invalidated": f.cache_invalidated,
        "previous_job_id": f.previous_job_id,
        "provenance_id": f.provenance_id,
        "deduplicated": f.decision == "deduplicated",
        "state": f.state,
    }
    if f.due_ms is not None:
        reply["due_at"] = ms_iso(f.due_ms)
    if f.why == "reuse":
        # The record names the result's job; a replay reads the result again (null once gone).
        reply["result"] = None if result is None else orjson.loads(result)
    return reply


class Lifecycle:
    """enqueue → deduplicate → track → cancel → invalidate, as calls of the store."""

    def __init__(self, store: Store, settings: Settings, metrics: Metrics) -> None:
        self._store = store
        self._settings = settings
        self._file = settings.file
        self._keys: Keys = store.keys
        self._m = metrics
        self._channel = self._keys.cancel_channel
        self._due = DueSets(store, settings.file.job_ttl)

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
        schedule = schedule_arg(req, jt, policy)  # before any write: it may refuse the request
        tag = scope_tag(req.cache_prefix, req.job_type)
        record, binding, bind_here = await self._record_keys(tag, ctx)
        decision = await self._decide_manage(
            req,
            ctx,
            policy=policy,
            tag=tag,
            record=record,
            binding=binding,
            bind_here=bind_here,
            schedule=schedule,
        )
        f = decision.facts
        if f.scheduled and f.due_ms is not None and decision.job_state in (None, "scheduled"):
            await self._due.add(f.job_id, f.due_ms)  # a replay adds it again: a crash came between
        reply = manage_reply(f, decision.result)
        out = Outcome(reply, replayed=decision.replayed)
        out.events = manage_events(
            f,
            actor=ctx.actor,
            request_id=ctx.request_id,
            req=req,
            request_input={**req.model_dump(), "policy": policy},
            reply=reply,
        )
        if f.enqueued:
            # Job id, priority and enqueued_at as recorded; the body is the recorded one too: the
            # record is bound to the digest of exactly this parsed body.
            priority = req.priority if f.priority is None else f.priority
            out.job = JobMessage(
                f.job_id, req.job_type, req.cache_prefix, req.payload, priority, f.at
            )
            out.queue = self._file.queue_for(req.job_type)
        self._settle_replay(out, decision, record, ctx, job_live=decision.job_state == "pending")
        if not decision.replayed:
            self._m.count_manage(req.job_type, req.priority, policy, f)
        return out

    async def _decide_manage(
        self,
        req: ManageRequest,
        ctx: Context,
        *,
        policy: str,
        tag: str,
        record: str,
        binding: str,
        bind_here: bool,
        schedule: str,
    ) -> Decision[ManageFacts]:
        k = self._keys
        job_id = new_job_id(tag)
        return await self._store.manage(
            scope=k.scope(tag, req.cache_prefix, req.job_type),
            result=k.result(tag, req.cache_prefix, req.job_type),
            record=record,
            job=k.job(job_id),
            history=k.history(job_id),
            binding=binding,
            policy=policy,
            job_id=job_id,
            now=iso(datetime.now(UTC)),
            # Without requested_at the script stamps the request with the Redis server's time.
            requested_at=micros(parse_time(req.requested_at)) if req.requested_at else "",
            cancel_running=req.cancel_running,
            record_request=ctx.idempotent,
            idempotency_ttl=self._file.idempotency_ttl,
            job_ttl=self._file.job_ttl,
            job_prefix=k.job_prefix(tag),
            job_type=req.job_type,
            cache_prefix=req.cache_prefix,
            priority=req.priority,
            request_id=ctx.request_id,
            provenance_id=new_id(),
            cancel_channel=self._channel,
            history_bound=HISTORY_BOUND,
            digest=ctx.digest,
            bind_here=bind_here,
            session=ctx.redelivered_in,
            terminal_ttl=self._file.terminal_ttl,
            type_settings=self._file.recorded_settings(req.job_type),
            schedule=schedule,
            max_history_jobs=self._file.max_history_jobs,
        )

    # -- idempotency -----------------------------------------------------------------------------

    async def _record_keys(self, tag: str, ctx: Context) -> tuple[str, str, bool]:
        """The request record and binding keys of a recording script, and its `bind here` flag.

        On one Redis the script binds the idempotency key itself (one round trip). On a Redis
        Cluster the binding lives in another slot: it is bound first, in a call of its own; a
        crash before the decision is harmless, the same request passes the binding again."""
        k = self._keys
        if not ctx.idempotent:
            return k.no_request(tag), k.no_request(tag), False
        record = k.request(tag, ctx.actor, ctx.request_id)
        binding = k.binding(ctx.actor, ctx.request_id)
        if self._settings.redis_cluster:
            await self._store.bind(
                binding=binding, digest=ctx.digest, ttl=self._file.idempotency_ttl
            )
            return record, k.no_request(tag), False
        return record, binding, True

    def _settle_replay(
        self, out: Outcome, decision: Decision[Any], record: str, ctx: Context, *, job_live: bool
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
        read = await self._store.status(
            job=self._keys.job(job_id), history=self._keys.history(job_id)
        )
        if not read.fields:
            raise NotFound(f"no job {job_id!r} (unknown, or expired)")
        return read.fields, read.history

    async def cancel(self, req: CancelRequest, ctx: Context) -> Outcome:
        if self._file.auth.enabled:
            job, _ = await self._read_job(req.job_id)
            self.authorize(ctx, "cancel", job["cache_prefix"], job["job_type"], req.job_id)
        tag = tag_of_job(req.job_id)
        if tag is None:
            raise NotFound(f"no job {req.job_id[:80]!r}")
        k = self._keys
        record, binding, bind_here = await self._record_keys(tag, ctx)
        decision = await self._store.cancel(
            job=k.job(req.job_id),
            history=k.history(req.job_id),
            record=record,
            binding=binding,
            running=req.running,
            now=iso(datetime.now(UTC)),
            record_request=ctx.idempotent,
            idempotency_ttl=self._file.idempotency_ttl,
            provenance_id=new_id(),
            cancel_channel=self._channel,
            job_id=req.job_id,
            history_bound=HISTORY_BOUND,
            job_ttl=self._file.job_ttl,
            digest=ctx.digest,
            bind_here=bind_here,
            session=ctx.redelivered_in,
            terminal_ttl=self._file.terminal_ttl,
            max_history_jobs=self._file.max_history_jobs,
        )
        f = decision.facts
        if f.not_found:
            raise NotFound(f"no job {req.job_id!r} (unknown, or expired)")
        reply = {
            "success": True,
            "job_id": req.job_id,
            "cancelled": f.cancelled,
            "state": f.state,
            "provenance_id": f.provenance_id,
        }
        out = Outcome(reply, replayed=decision.replayed)
        out.events.append(
            Event(
                f.provenance_id,
                "job.cancelled" if f.cancelled else "job.cancel_declined",
                f.state,
                f.at,
                ctx.actor,
                ctx.request_id,
                req.job_id,
                scope_of(f.cache_prefix, f.job_type),
                req.model_dump(),
                {**reply, "previous_state": f.previous_state},
            )
        )
        self._settle_replay(out, decision, record, ctx, job_live=False)
        if f.cancelled and not decision.replayed:
            jt = self._m.job_type_label(f.job_type or "")
            self._m.jobs_cancelled.labels(job_type=jt, reason="requested").inc()
        return out

    async def status(self, req: StatusRequest, ctx: Context) -> Outcome:
        job, history = await self._read_job(req.job_id)
        self.authorize(ctx, "status", job["cache_prefix"], job["job_type"], req.job_id)
        reply = status_reply(req.job_id, job, history)
        return Outcome(reply)

    # -- by scope --------------------------------------------------------------------------------

    async def invalidate(self, req: ScopeRequest, ctx: Context) -> Outcome:
        tag = scope_tag(req.cache_prefix, req.job_type)
        k = self._keys
        record, binding, bind_here = await self._record_keys(tag, ctx)
        decision = await self._store.invalidate(
            result=k.result(tag, req.cache_prefix, req.job_type),
            record=record,
            binding=binding,
            record_request=ctx.idempotent,
            idempotency_ttl=self._file.idempotency_ttl,
            provenance_id=new_id(),
            now=iso(datetime.now(UTC)),
            digest=ctx.digest,
            bind_here=bind_here,
            session=ctx.redelivered_in,
        )
        f = decision.facts
        inv = f.cache_invalidated
        reply = {"success": True, "cache_invalidated": inv, "provenance_id": f.provenance_id}
        out = Outcome(reply, replayed=decision.replayed)
        out.events.append(
            Event(
                f.provenance_id,
                "cache.invalidated",
                "invalidated" if inv else "unchanged",
                f.at,
                ctx.actor,
                ctx.request_id,
                f.job_id,
                scope_of(req.cache_prefix, req.job_type),
                req.model_dump(),
                reply,
            )
        )
        self._settle_replay(out, decision, record, ctx, job_live=False)
        if inv and not decision.replayed:
            self._m.cache_invalidations.labels(job_type=self._m.job_type_label(req.job_type)).inc()
        return out

    async def result(self, req: ScopeRequest, ctx: Context) -> Outcome:
        tag = scope_tag(req.cache_prefix, req.job_type)
        cached = await self._store.result(
            result=self._keys.result(tag, req.cache_prefix, req.job_type)
        )
        hit = cached.job_id is not None
        reply: dict[str, Any] = {
            "success": True,
            "cached": hit,
            "job_id": cached.job_id,
            "result": orjson.loads(cached.value) if hit else None,  # type: ignore[arg-type]
        }
        if hit and cached.at is not None:
            reply["cached_at"] = cached.at
        return Outcome(reply)

    # -- rejections ------------------------------------------------------------------------------

    def rejected(self, op: str, error: JlmError, ctx: Context, body_size: int) -> Outcome:
        """The reply and `request.rejected` event of a request that can never succeed."""
        reply = error_reply(error.code, error.message)
        event = rejected_event(op, reply, ctx.actor, ctx.request_id, body_size)
        return Outcome(reply, events=[event])
