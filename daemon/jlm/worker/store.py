"""The worker's Redis side: typed calls of claim.lua, heartbeat.lua, progress.lua, finish.lua and
release.lua."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from jlm.config import Settings
from jlm.keys import Keys, scope_tag, tag_of_job
from jlm.store import HISTORY_BOUND, RedisClient, Store, connect

SCRIPTS = ("claim", "heartbeat", "progress", "finish", "release")
# At most one job.progress event per job per this many ms (progress itself is stored every time).
PROGRESS_EVENT_MS = 1000
Outcome = Literal["succeeded", "failed", "stopped", "rejected"]


@dataclass(frozen=True, slots=True)
class Facts:
    """What a script decided, as the JSON object it returned."""

    raw: dict[str, Any]

    @property
    def o(self) -> str:
        return str(self.raw["o"])

    @property
    def state(self) -> str:
        return str(self.raw.get("state") or "unknown")

    def get(self, name: str, default: Any = None) -> Any:
        return self.raw.get(name, default)


@dataclass(frozen=True, slots=True)
class Run:
    """Names one claim of one job: the owner and the claim sequence it got."""

    job_id: str
    owner: str
    claim: int


class WorkerStore:
    """One call per worker script; each is one round trip and one atomic step."""

    def __init__(
        self, store: Store, job_ttl: int, terminal_ttl: int, max_history_jobs: int
    ) -> None:
        self.store = store
        self.keys: Keys = store.keys
        # Every script that can end a job gets all three: a job's state after the call picks its
        # TTL, and a job that ends counts toward its scope's bound of terminal jobs.
        self._ending = (job_ttl, terminal_ttl, max_history_jobs)
        for name in SCRIPTS:
            store.register(name)

    async def _facts(self, name: str, keys: list[str], args: list[Any]) -> Facts:
        raw = await self.store.run(name, keys, args)
        return Facts(orjson.loads(raw))

    async def claim(
        self,
        job_id: str,
        owner: str,
        now: str,
        *,
        lease_ms: int,
        max_attempts: int | str,
    ) -> Facts:
        """Decided from the job's record alone, never from the job message. `max_attempts`:
        the worker's own setting, or '' for the one recorded on the job."""
        k = self.keys
        return await self._facts(
            "claim",
            [k.job(job_id), k.history(job_id)],
            [owner, now, lease_ms, max_attempts, HISTORY_BOUND, *self._ending],
        )

    async def heartbeat(self, run: Run, lease_ms: int) -> str:
        state, _ = await self.store.run(
            "heartbeat", [self.keys.job(run.job_id)], [run.owner, run.claim, lease_ms]
        )
        return state.decode() if isinstance(state, bytes) else str(state)

    async def progress(self, run: Run, progress: dict[str, Any]) -> Facts:
        """Store the run's latest progress; refused unless the run still holds a current job."""
        return await self._facts(
            "progress",
            [self.keys.job(run.job_id)],
            [run.owner, run.claim, orjson.dumps(progress).decode(), PROGRESS_EVENT_MS],
        )

    async def finish(
        self,
        run: Run,
        scope: tuple[str, str],
        outcome: Outcome,
        now: str,
        value: str,
        *,
        result_ttl: int,
        max_attempts: int,
        stop_note: str = "stopped by worker",
    ) -> Facts:
        """`scope` is (cache_prefix, job_type) as the job's record names them."""
        cache_prefix, job_type = scope
        tag = scope_tag(cache_prefix, job_type)
        if tag != tag_of_job(run.job_id):
            raise ValueError(f"job {run.job_id} does not belong to scope {cache_prefix}/{job_type}")
        k = self.keys
        return await self._facts(
            "finish",
            [
                k.job(run.job_id),
                k.history(run.job_id),
                k.scope(tag, cache_prefix, job_type),
                k.result(tag, cache_prefix, job_type),
            ],
            [
                outcome,
                run.owner,
                run.claim,
                now,
                value,
                result_ttl,
                max_attempts,
                run.job_id,
                HISTORY_BOUND,
                self._ending[0],
                stop_note,
                *self._ending[1:],
            ],
        )

    async def release(self, run: Run, now: str, reason: str) -> Facts:
        k = self.keys
        return await self._facts(
            "release",
            [k.job(run.job_id), k.history(run.job_id)],
            [run.owner, run.claim, now, reason, HISTORY_BOUND, *self._ending],
        )


def redis_client(
    settings: Settings, cluster: bool, url: str | None = None, *, retry: bool = True
) -> RedisClient:
    """A client of the configured Redis (or of the node at `url`), with the configured TLS."""
    return connect(
        url or settings.redis_url,
        cluster=cluster,
        retry=retry,
        ca_file=str(settings.tls_ca_file) if settings.tls_ca_file else None,
        cert_file=str(settings.tls_cert_file) if settings.tls_cert_file else None,
        key_file=str(settings.tls_key_file) if settings.tls_key_file else None,
        verify=settings.tls_verify,
    )
