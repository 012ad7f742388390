"""Handlers that `jlm worker tests.trust_handlers:NAME` runs in the worker trust tests."""

from __future__ import annotations

from typing import Any

from jlm.worker import Job


async def picky(job: Job) -> dict[str, Any]:
    """Fail on a forged payload, echo a real one."""
    if job.payload.get("forged"):
        raise RuntimeError("forged payload")
    return {"v": job.payload.get("v"), "attempt": job.attempt}
