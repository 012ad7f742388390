"""`jlm worker MODULE:APP` and `jlm worker MODULE:FUNCTION --job-type T`: a Worker with signals,
logs and exit codes."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import anyio

from jlm import __version__
from jlm.config import NAME_RE, Settings, redact_url
from jlm.errors import Refused, Unavailable
from jlm.systemd import Notifier, watchdog_loop
from jlm.worker.app import Worker
from jlm.worker.job import Handler, HandlerImportError, as_handler, load_target
from jlm.worker.registry import App, routes_of

log = logging.getLogger(__name__)
EX_OK, EX_USAGE, EX_UNAVAILABLE, EX_CONFIG = 0, 2, 69, 78


async def run_worker_cli(
    settings: Settings, target: str, job_type: str | None, concurrency: int
) -> int:
    """`jlm worker MODULE:APP` (every job type of the app; `--job-type` picks one) or
    `jlm worker MODULE:FUNCTION --job-type T`: 0 on a clean stop, 2 when the target cannot be
    imported (or the arguments are wrong), 69 when Redis or the broker is down at start, 78
    when the broker refuses the login or virtual host at start, or a job type is not configured
    while the configuration restricts them."""
    if (job_type is not None and not NAME_RE.match(job_type)) or concurrency < 1:
        log.error("--job-type must match %s and --concurrency be >= 1", NAME_RE.pattern)
        return EX_USAGE
    try:
        obj = load_target(target)
        handler: Handler | App = obj if isinstance(obj, App) else as_handler(obj, target)
        routes = routes_of(settings, handler, job_type, concurrency)
    except (HandlerImportError, ValueError) as exc:
        log.error("jlm worker: %s", exc)
        return EX_USAGE
    for name in routes:
        if settings.file.job_type(name) is None:
            log.error(
                "JLM_CONFIG: job type %r is not configured (allow_any_job_type = false)", name
            )
            return EX_CONFIG
    worker = Worker(settings, handler, job_type, concurrency)
    log.info(
        "jlm worker %s (%s): %s for %s",
        worker.id,
        __version__,
        target,
        ", ".join(f"{r.job_type!r} (concurrency {r.concurrency})" for r in routes.values()),
    )
    notifier = Notifier.from_env()
    signals = asyncio.create_task(_signals(worker, notifier))
    systemd = asyncio.create_task(_systemd(worker, notifier))
    try:
        await worker.run()
    except Refused as exc:
        log.error("cannot start: %s", redact_url(exc.message))
        return EX_CONFIG
    except Unavailable as exc:
        log.error("cannot start: %s", redact_url(exc.message))
        return EX_UNAVAILABLE
    finally:
        signals.cancel()
        systemd.cancel()
        await asyncio.gather(signals, systemd, return_exceptions=True)
        notifier.close()
    return EX_OK


async def _systemd(worker: Worker, notifier: Notifier) -> None:
    """Under systemd (Type=notify): READY=1 once consuming every queue, then WATCHDOG=1 while the
    event loop runs and the worker has not been unready for `watchdog_unready_limit` seconds."""
    if not notifier.enabled:
        return
    await worker.started.wait()
    notifier.ready(f"consuming {worker.job_type}")
    unready_since: float | None = None

    def healthy() -> bool:
        nonlocal unready_since
        if worker.health.ready:
            unready_since = None
            return True
        unready_since = unready_since or time.monotonic()
        return time.monotonic() - unready_since < worker.settings.watchdog_unready_limit

    await watchdog_loop(notifier, healthy)


async def _signals(worker: Worker, notifier: Notifier) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not worker.stopping:
                log.info("%s: stopping (a second signal stops running handlers now)", name)
                notifier.stopping(f"draining {len(worker.running)} running jobs")
                worker.stop()
            else:
                log.warning("%s again: stopping running handlers now", name)
                worker.stop(force=True)
