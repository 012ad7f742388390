"""The blocking twin of `JobsClient`, for code without an event loop (a Django view, a script).

`with BlockingJobsClient.connect(url) as jobs:` runs a `JobsClient` on an event loop of its own, in
a daemon thread; each call waits for its coroutine there. Safe to call from several threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

from jlm.client import JobsClient
from jlm.messages import CachedResult, CancelReply, Decision, InvalidateReply, JobStatus

T = TypeVar("T")

__all__ = ["BlockingJob", "BlockingJobsClient"]


class BlockingJobsClient:
    """`JobsClient`'s calls, blocking: `manage`, `status`, `cancel`, `invalidate`, `cached`,
    `job(id)`; the same arguments, replies and exceptions."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="jlm client loop", daemon=True
        )
        self._thread.start()
        self._client = JobsClient(url, **kwargs)
        try:
            self._call(self._client._open())
        except BaseException:
            self._stop()
            raise

    @classmethod
    def connect(cls, url: str, **kwargs: Any) -> BlockingJobsClient:
        """A connected client of the broker at `url`; use it in a `with` block, or `close()`."""
        return cls(url, **kwargs)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():
            coro.close()
            raise RuntimeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self._call(self._client.aclose())
            self._stop()

    def manage(self, job_type: str, payload: dict[str, Any], **kwargs: Any) -> Decision:
        return self._call(self._client.manage(job_type, payload, **kwargs))

    def status(self, job_id: str) -> JobStatus:
        return self._call(self._client.status(job_id))

    def cancel(self, job_id: str, *, running: bool = False, **kwargs: Any) -> CancelReply:
        return self._call(self._client.cancel(job_id, running=running, **kwargs))

    def invalidate(self, job_type: str, **kwargs: Any) -> InvalidateReply:
        return self._call(self._client.invalidate(job_type, **kwargs))

    def cached(self, job_type: str, *, prefix: str = "job") -> CachedResult:
        return self._call(self._client.cached(job_type, prefix=prefix))

    def job(self, job_id: str) -> BlockingJob:
        return BlockingJob(self, job_id)


class BlockingJob:
    """One job, by id, blocking: `status()`, `result(timeout=)`, `cancel(running=)`, `wait()`."""

    def __init__(self, client: BlockingJobsClient, job_id: str) -> None:
        self.id = job_id
        self._client = client
        self._job = client._client.job(job_id)

    def __repr__(self) -> str:
        return f"BlockingJob({self.id!r})"

    def status(self) -> JobStatus:
        return self._client._call(self._job.status())

    def cancel(self, *, running: bool = False) -> CancelReply:
        return self._client._call(self._job.cancel(running=running))

    def wait(self, timeout: float | None = None) -> JobStatus:
        return self._client._call(self._job.wait(timeout))

    def result(self, timeout: float | None = None) -> Any:
        return self._client._call(self._job.result(timeout))
