"""`App`: handlers registered by job type, with typed payloads, hooks and shared state.

    app = App()

    @app.job("thumb.make", payload=ThumbIn, concurrency=4)
    async def thumb(job: Job[ThumbIn]) -> dict: ...

`jlm worker MODULE:APP` serves every registered job type in one process, on one broker
connection, each with its own concurrency.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, TypeVar

from pydantic import BaseModel

from jlm.config import NAME_RE, Settings
from jlm.worker.job import Handler

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
Hook = Callable[["App"], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Route:
    """One job type a worker serves: its handler, payload model, concurrency and queue."""

    job_type: str
    handler: Handler
    concurrency: int = 1
    payload: type[BaseModel] | None = None
    queue: str | None = None  # None: the configured queue, else jlm.jobs.<job_type>


class App:
    """Handlers by job type, start-up and shutdown hooks, and `state` shared by the handlers."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.state = SimpleNamespace()
        self.startup: list[Hook] = []
        self.shutdown: list[Hook] = []

    def job(
        self,
        job_type: str,
        *,
        payload: type[BaseModel] | None = None,
        concurrency: int = 1,
        queue: str | None = None,
    ) -> Callable[[F], F]:
        """Register the decorated `async def handler(job)` for `job_type`.

        With `payload`, a pydantic model, the handler's `job.payload` is an instance of it; a
        payload that fails it fails the job at once (no retry) with the validation message.
        """
        if not NAME_RE.match(job_type):
            raise ValueError(f"job type {job_type!r} must match {NAME_RE.pattern}")
        if job_type in self.routes:
            raise ValueError(f"job type {job_type!r} is registered twice")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")

        def register(handler: F) -> F:
            self.routes[job_type] = Route(job_type, handler, concurrency, payload, queue)
            return handler

        return register

    def on_startup(self, hook: Hook) -> Hook:
        """Run `await hook(app)` before the first job (e.g. open a pool into `app.state`)."""
        self.startup.append(hook)
        return hook

    def on_shutdown(self, hook: Hook) -> Hook:
        """Run `await hook(app)` after the last job ended (reverse order of registration)."""
        self.shutdown.append(hook)
        return hook


def routes_of(
    settings: Settings, handler: Handler | App, job_type: str | None, concurrency: int
) -> dict[str, Route]:
    """The job types a worker serves, each with its queue: an app's (or the one of them named by
    `job_type`), or one handler's."""
    if isinstance(handler, App):
        routes = list(handler.routes.values())
        if job_type is not None:
            routes = [r for r in routes if r.job_type == job_type]
        if not routes:
            raise ValueError(f"the app has no handler for {job_type or 'any job type'}")
    else:
        if job_type is None:
            raise ValueError("a handler needs its job type")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        routes = [Route(job_type, handler, concurrency)]
    return {
        r.job_type: dataclasses.replace(r, queue=r.queue or settings.file.queue_for(r.job_type))
        for r in routes
    }


async def run_hooks(app: App, hooks: list[Hook]) -> None:
    """Run start-up or shutdown hooks, one after the other."""
    for hook in hooks:
        await hook(app)
