"""The smallest handler: `jlm worker examples.echo:handle --job-type demo`.

Its result, cached for the job's scope, is the payload it was given:

    jlm submit demo --payload '{"x": 1}' --until-done
"""

from __future__ import annotations

from typing import Any

from jlm.worker import Job


async def handle(job: Job) -> dict[str, Any]:
    return {"echo": job.payload}
