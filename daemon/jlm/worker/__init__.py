"""The worker SDK: consume a job queue, claim each job, run an async handler, report the outcome.

An `App` registers handlers by job type (`@app.job("t", payload=Model, concurrency=N)`);
`Worker(settings, app).run()` serves them all, `Worker(settings, handle, job_type).run()` one
handler. The modules: `app` (the `Worker`), `runner` (one claimed run), `job` (the job and its
message), `store` (the typed calls of the worker's Lua scripts), `broker` (its AMQP session),
`cancels` (cancellations pushed on Redis pub/sub), `registry` (the `App`) and `cli`
(`jlm worker MODULE:APP`).
"""

from jlm.worker.app import Worker
from jlm.worker.cli import run_worker_cli
from jlm.worker.job import Handler, Job
from jlm.worker.registry import App

__all__ = ["App", "Handler", "Job", "Worker", "run_worker_cli"]
