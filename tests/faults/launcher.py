"""`python -m tests.faults.launcher`: `jlm run` with a fault compiled in for tests only.

The product has no fault code: it offers one test hook, `Service.after_decision`, called after a
decision is committed in Redis and before anything is published. This launcher, which only the
fault suite runs, installs a hook that kills the process on the n-th decision:

    JLM_TEST_FAULT=crash_after_decision:<n>   os._exit(137) on the n-th decision
    JLM_TEST_FAULT_REPORT=<path>              first write the decision's request id and job id there
    JLM_TEST_FAULT=delay_decision:<ms>:<seed> before each Redis decision, wait a random 0..ms
                                              (a fixed seed): requests of one scope delivered to
                                              several daemons reach Redis out of delivery order
    JLM_TEST_FAULT=crash_after_promote:<n>    os._exit(137) once the scheduler made its n-th due
                                              job pending (promote.lua), before its publish

Everything else is read from the environment exactly as `jlm run` reads it.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from jlm import logs
from jlm.config import load_settings
from jlm.lifecycle import Outcome
from jlm.service import Service
from jlm.store import Decision, Store


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


def delay_decisions(store: Store, max_ms: float, seed: int) -> None:
    """Wrap the store's decisions: each waits a random time first (after the request was read)."""
    rnd = random.Random(seed)
    decide = store.decide

    async def delayed(name: str, keys: Sequence[str], args: Sequence[Any]) -> Decision:
        await asyncio.sleep(rnd.random() * max_ms / 1000)
        return await decide(name, keys, args)

    store.decide = delayed  # type: ignore[method-assign]  # the fault hook wraps the real call


def crash_after_promote(store: Store, n: int) -> None:
    """Wrap the store's script calls: the process dies right after the n-th `promote`."""
    seen = 0
    run = store.run

    async def counted(name: str, keys: Sequence[str], args: Sequence[Any], **kw: Any) -> Any:
        nonlocal seen
        result = await run(name, keys, args, **kw)
        if name == "promote":
            seen += 1
            if seen >= n:
                os._exit(137)  # entries taken, some jobs pending, nothing of them published
        return result

    store.run = counted  # type: ignore[method-assign]  # the fault hook wraps the real call


async def main() -> None:
    settings = load_settings()
    logs.setup(settings.log_level, settings.log_format)
    service = Service(settings)
    fault = os.environ.get("JLM_TEST_FAULT", "")
    kind, _, arg = fault.partition(":")
    if kind == "crash_after_decision":
        service.after_decision = crash_after(int(arg), os.environ.get("JLM_TEST_FAULT_REPORT"))
    elif kind == "delay_decision":
        max_ms, _, seed = arg.partition(":")
        delay_decisions(service.store, float(max_ms), int(seed or "0"))
    elif kind == "crash_after_promote":
        crash_after_promote(service.store, int(arg))
    elif fault:
        sys.exit(f"JLM_TEST_FAULT: unknown fault {fault!r}")
    await service.run()


if __name__ == "__main__":
    asyncio.run(main())
