"""`python -m tests.faults.launcher`: `jlm run` with a fault compiled in for tests only.

The product has no fault code: it offers one test hook, `Service.after_decision`, called after a
decision is committed in Redis and before anything is published. This launcher, which only the
fault suite runs, installs a hook that kills the process on the n-th decision:

    JLM_TEST_FAULT=crash_after_decision:<n>   os._exit(137) on the n-th decision
    JLM_TEST_FAULT_REPORT=<path>              first write the decision's request id and job id there

Everything else is read from the environment exactly as `jlm run` reads it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable

import orjson

from jlm import logs
from jlm.config import load_settings
from jlm.lifecycle import Outcome
from jlm.service import Service


def crash_after(n: int, report: str | None) -> Callable[[Outcome], Awaitable[None]]:
    seen = 0

    async def hook(outcome: Outcome) -> None:
        nonlocal seen
        seen += 1
        if seen < n:
            return
        if report:
            main = outcome.events[-1] if outcome.events else None
            with open(report, "wb") as f:  # noqa: ASYNC230 - the process ends right after
                f.write(
                    orjson.dumps(
                        {
                            "request_id": main.request_id if main else None,
                            "job_id": outcome.reply.get("new_job_id"),
                            # The decision enqueued a job (a replay of it need not publish it).
                            "enqueued": outcome.reply.get("deduplicated") is False,
                            "replayed": outcome.replayed,
                            "reply": outcome.reply,
                        }
                    )
                )
        os._exit(137)  # no cleanup, no ack, no publish: as if the power went out here

    return hook


async def main() -> None:
    settings = load_settings()
    logs.setup(settings.log_level, settings.log_format)
    service = Service(settings)
    fault = os.environ.get("JLM_TEST_FAULT", "")
    kind, _, arg = fault.partition(":")
    if kind == "crash_after_decision":
        service.after_decision = crash_after(int(arg), os.environ.get("JLM_TEST_FAULT_REPORT"))
    elif fault:
        sys.exit(f"JLM_TEST_FAULT: unknown fault {fault!r}")
    await service.run()


if __name__ == "__main__":
    asyncio.run(main())
