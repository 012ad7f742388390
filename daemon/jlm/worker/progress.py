"""A running job's progress: stored on the job by progress.lua (refused unless the run still holds
a current job), and published as a `job.progress` event at most once a second per job."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from jlm.errors import Unavailable
from jlm.provenance import Event
from jlm.worker.job import Active, now, worker_event
from jlm.worker.store import WorkerStore

log = logging.getLogger(__name__)
MAX_MESSAGE = 1000  # characters of a progress message kept


class Progress:
    """`Job.progress` of one run."""

    def __init__(  # noqa: PLR0917 - what one run's progress needs, each once
        self,
        store: WorkerStore,
        emit: Callable[[Event], Awaitable[None]],
        worker_id: str,
        active: Active,
        claimed: asyncio.Task[None],
        request_id: str | None,
    ) -> None:
        self._store = store
        self._emit = emit
        self._worker_id = worker_id
        self._active = active
        self._claimed = claimed
        self._request_id = request_id
        self._last: asyncio.Task[None] | None = None  # the latest job.progress publish

    async def report(self, fraction: float, message: str) -> bool:
        job = self._active.job
        progress: dict[str, Any] = {
            "fraction": fraction,
            "message": message[:MAX_MESSAGE],
            "at": now(),
        }
        try:
            facts = await self._store.progress(self._active.run, progress)
        except Unavailable as exc:
            log.warning("job %s: progress not stored: %s", job.id, exc.message)
            return False
        if facts.o != "stored":
            log.info(
                "job %s: progress refused (%s%s)",
                job.id,
                facts.state,
                ", superseded" if facts.get("superseded_by") else "",
                extra={"job_id": job.id},
            )
            return False
        if facts.get("emit"):
            event = worker_event(
                "job.progress",
                "running",
                job.id,
                (job.cache_prefix, job.job_type),
                request_id=self._request_id,
                input_={"worker": self._worker_id, "attempt": job.attempt},
                output=progress,
            )
            self._last = asyncio.create_task(self._publish(event, self._last))
        return True

    async def _publish(self, event: Event, previous: asyncio.Task[None] | None) -> None:
        """After the claim's event and the previous progress event: the stream keeps their order."""
        await self._claimed
        if previous is not None:
            await previous
        await self._emit(event)

    async def published(self) -> None:
        """Wait until the progress events reported so far are published (before the outcome's)."""
        if self._last is not None:
            await self._last
