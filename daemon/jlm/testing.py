"""Test a worker app's handlers against a real Redis, without a broker or a daemon process.

    from jlm.testing import run_job

    async def test_render() -> None:
        run = await run_job(app, "report.render", {"pages": 2})
        assert run.state == "succeeded" and run.result == {"report": "test", "pages": 2}

`run_job` makes the job as the daemon decides it (`manage.lua`), then runs the registered
handler as a worker does: claim → handler (with progress and cancellation) → finish, retries
included. Redis is `JLM_REDIS_URL` (default `redis://localhost:6379/0`); each call uses a fresh
key namespace, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from jlm.config import Settings, load_settings
from jlm.keys import Keys
from jlm.lifecycle import Context, Lifecycle
from jlm.metrics import Metrics
from jlm.protocol import CancelRequest, ManageRequest, ScopeRequest, StatusRequest
from jlm.provenance import Event
from jlm.store import Store
from jlm.worker.job import Active, ReceivedJob, claimed_run, now
from jlm.worker.registry import App, Route, routes_of, run_hooks
from jlm.worker.runner import Deps, JobRunner
from jlm.worker.store import WorkerStore, redis_client

WORKER_ID = "jlm.testing"


@dataclass(frozen=True, slots=True)
class JobRun:
    """What became of one job: its final state and error, the scope's cached result, the latest
    progress, the job's history and the events the worker published."""

    job_id: str
    state: str
    attempts: int
    result: Any  # the cached result (None when nothing was cached)
    cached: bool
    error: str | None
    progress: dict[str, Any] | None
    history: list[dict[str, Any]]
    events: list[dict[str, Any]]


async def run_job(
    app: App,
    job_type: str,
    payload: dict[str, Any],
    *,
    cache_prefix: str = "test",
    cancel_after: float | None = None,
    settings: Settings | None = None,
    startup: bool = True,
) -> JobRun:
    """Run `app`'s handler of `job_type` for one job with `payload` until the job is final.

    `cancel_after`: cancel the job that many seconds after its handler started, as
    `jlm cancel --running` does. `startup`: run the app's start-up and shutdown hooks around it.
    `settings`: Redis and the job types' settings (max_attempts, result_ttl, retry_backoff); by
    default `JLM_REDIS_URL` and `JLM_CONFIG` of the environment, with a fresh namespace.
    """
    if settings is None:
        env = {k: v for k, v in os.environ.items() if k in ("JLM_REDIS_URL", "JLM_CONFIG")}
        settings = load_settings(env | {"JLM_REDIS_NAMESPACE": f"jlm-testing-{uuid.uuid4().hex}"})
    route = routes_of(settings, app, job_type, 1)[job_type]
    metrics = Metrics()
    store = Store(
        redis_client(settings, settings.redis_cluster), Keys(settings.redis_namespace), metrics
    )
    harness = _Harness(settings, store, metrics, route)
    try:
        if startup:
            await run_hooks(app, app.startup)
        try:
            return await harness.run(payload, cache_prefix, cancel_after)
        finally:
            if startup:
                await run_hooks(app, app.shutdown[::-1])
    finally:
        if harness.fresh_namespace:
            await harness.forget()
        await store.close()


class _Harness:
    """A daemon's decisions and a worker's steps, on one Redis, with the events kept in a list."""

    def __init__(self, settings: Settings, store: Store, metrics: Metrics, route: Route) -> None:
        self.settings = settings
        self.store = store
        self.route = route
        self.lifecycle = Lifecycle(store, settings, metrics)
        self.events: list[dict[str, Any]] = []
        self.abandoned: set[asyncio.Task[Any]] = set()
        self.fresh_namespace = settings.redis_namespace.startswith("jlm-testing-")
        stopping = asyncio.Event()
        stopping.set()  # a retry is run at once, not after its backoff
        self.deps = Deps(
            settings=settings,
            store=WorkerStore(
                store,
                settings.file.job_ttl,
                settings.file.terminal_ttl,
                settings.file.max_history_jobs,
            ),
            metrics=metrics,
            emit=self._emit,
            republish=self._republish,
            abandon=lambda task, _: self.abandoned.add(task),
            warn=lambda _key, text, arg: None,
            stopping=stopping,
            give_up=asyncio.Event(),
            lease_ms=60_000,
            cancel_grace=1.5,
            worker_id=WORKER_ID,
        )

    async def _emit(self, event: Event) -> None:
        self.events.append(event.body())

    async def _republish(self, msg: ReceivedJob, gen: int) -> bool:
        return True  # the next claim of run() is the retry's delivery

    def _context(self) -> Context:
        return Context(uuid.uuid4().hex, False, None)

    async def run(self, payload: dict[str, Any], prefix: str, cancel_after: float | None) -> JobRun:
        jt = self.route.job_type
        req = ManageRequest(job_type=jt, payload=payload, cache_prefix=prefix)
        decided = await self.lifecycle.manage(req, self._context())
        assert decided.job is not None, decided.reply
        self.events += [e.body() for e in decided.events]
        job = decided.job
        body = orjson.dumps(job.body())
        msg = ReceivedJob(
            job.job_id,
            job.job_type,
            job.cache_prefix,
            job.payload,
            job.priority,
            job.enqueued_at,
            body,
        )
        while await self._attempt(msg, cancel_after):
            pass
        return await self._outcome(job.job_id, prefix)

    async def _attempt(self, msg: ReceivedJob, cancel_after: float | None) -> bool:
        """Claim and run once; True when the job went back to pending (a retry)."""
        ws = self.deps.store
        facts = await ws.claim(msg.job_id, WORKER_ID, now(), lease_ms=60_000, max_attempts="")
        if facts.o != "claimed":
            return False
        active, event = claimed_run(WORKER_ID, msg, facts)
        claimed = asyncio.create_task(self._emit(event))
        later: list[Any] = [claimed]
        canceller = None
        if cancel_after is not None:
            canceller = asyncio.create_task(self._cancel(active, cancel_after))
        try:
            runner = JobRunner(
                self.deps, active, msg, claimed, later, route=self.route, claimed_facts=facts
            )
            await runner.run()
        finally:
            if canceller is not None:
                canceller.cancel()
        for step in later:
            await step
        return (await ws.store.client.hget(ws.keys.job(msg.job_id), "state")) == b"pending"

    async def _cancel(self, active: Active, after: float) -> None:
        """`jlm cancel --running` after `after` seconds, and the notice a worker gets."""
        await asyncio.sleep(after)
        await self.lifecycle.cancel(
            CancelRequest(job_id=active.job.id, running=True), self._context()
        )
        active.interrupt("cancelled")

    async def _outcome(self, job_id: str, prefix: str) -> JobRun:
        status = (await self.lifecycle.status(StatusRequest(job_id=job_id), self._context())).reply
        scope = ScopeRequest(job_type=self.route.job_type, cache_prefix=prefix)
        cached = (await self.lifecycle.result(scope, self._context())).reply
        mine = cached.get("cached") and cached.get("job_id") == job_id
        return JobRun(
            job_id=job_id,
            state=str(status["state"]),
            attempts=int(status["attempt"]),
            result=cached.get("result") if mine else None,
            cached=bool(mine),
            error=status.get("error"),
            progress=status.get("progress"),
            history=list(status["history"]),
            events=self.events,
        )

    async def forget(self) -> None:
        client = self.store.client
        keys = [k async for k in client.scan_iter(match=f"{self.settings.redis_namespace}:*")]
        if keys:
            for key in keys:  # one by one: keys of many slots on a Redis Cluster
                await client.delete(key)
