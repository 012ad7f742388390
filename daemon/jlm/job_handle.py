"""A publisher's handle on one job: `status()`, `cancel(running=)`, `wait(timeout=)` and
`result(timeout=)` (`JobsClient.job(id)` makes one)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from jlm.client_errors import JobCancelled, JobFailed, JobTimeout, ResultGone
from jlm.messages import CancelReply, JobStatus
from jlm.retry import Backoff

if TYPE_CHECKING:
    from jlm.client import JobsClient

FINAL = frozenset({"succeeded", "failed", "cancelled"})


class Job:
    """One job, by id: `status()`, `result(timeout=)`, `cancel(running=)`."""

    def __init__(self, client: JobsClient, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    async def status(self) -> JobStatus:
        return await self.client.status(self.id)

    async def cancel(self, *, running: bool = False) -> CancelReply:
        return await self.client.cancel(self.id, running=running)

    async def wait(self, timeout: float | None = None) -> JobStatus:
        """The job's status once it is final (succeeded, failed, cancelled); JobTimeout if it is
        not within `timeout` seconds (None: wait as long as it takes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        polls = Backoff(0.05, 1.0)  # quick for short jobs, once a second for long ones
        while True:
            status = await self.status()
            if status.state in FINAL:
                return status
            if deadline is not None and time.monotonic() + polls.delay > deadline:
                raise JobTimeout(f"job {self.id} is still {status.state} after {timeout:g}s")
            await asyncio.sleep(polls.next())

    async def result(self, timeout: float | None = None) -> Any:
        """The job's result once it succeeded (the scope's cached result, if still its own).

        JobFailed, JobCancelled, ResultGone or JobTimeout otherwise.
        """
        status = await self.wait(timeout)
        if status.state == "failed":
            raise JobFailed(f"job {self.id} failed: {status.error or 'no error recorded'}")
        if status.state == "cancelled":
            raise JobCancelled(f"job {self.id} was cancelled")
        cached = await self.client.cached(status.job_type, prefix=status.cache_prefix)
        if not cached.cached or cached.job_id != self.id:
            raise ResultGone(
                f"job {self.id} succeeded, but the scope's cached result is "
                + (
                    "gone (expired or invalidated)"
                    if not cached.cached
                    else f"job {cached.job_id}'s"
                )
            )
        return cached.result
