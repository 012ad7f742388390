"""The worker SDK: consume a job queue, claim each job, run an async handler, report the outcome.

A handler is `async def handle(job: Job) -> result`; `Worker(settings, handle, job_type).run()`
runs it. The modules: `app` (the `Worker`), `runner` (one claimed run), `job` (the job and its
message), `store` (the typed calls of the worker's Lua scripts), `broker` (its AMQP session),
`cancels` (cancellations pushed on Redis pub/sub) and `cli` (`jlm worker MODULE:FUNCTION`).
"""

from jlm.worker.app import Worker
from jlm.worker.cli import run_worker_cli
from jlm.worker.job import Handler, Job

__all__ = ["Handler", "Job", "Worker", "run_worker_cli"]
