"""The `jlm` command line: run the daemon, talk to it, run a worker, check the configuration.

Start-up is kept cheap (`jlm --help` and `jlm status` answer in a blink): the AMQP client, Redis,
the metrics and the daemon's models are imported inside the subcommands that use them.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from typing import TYPE_CHECKING

from jlm.cli.output import (
    EX_CONFIG,
    EX_OK,
    EX_SOFTWARE,
    EX_UNAVAILABLE,
    EX_USAGE,
    fail,
    print_error,
)
from jlm.cli.parser import build_parser

if TYPE_CHECKING:
    from jlm.config import Settings
    from jlm.errors import Refused


def main(argv: list[str] | None = None) -> int:
    """`jlm ...`: the exit code. Run on the process's own command line (`argv` None), a client
    command ends the process itself once its output is flushed: nothing is left to clean up, and
    the interpreter's teardown of every imported module would cost a quarter of its CPU time."""
    parser = build_parser()
    args = parser.parse_args(argv)
    code = _main(parser, args)
    if argv is None and args.command not in ("run", "worker"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "completion":
        from jlm.completion import script

        print(script(parser, args.shell), end="")
        return EX_OK
    if args.command not in ("run", "worker"):
        # A client command lives for one request: the collector's passes over the classes its
        # imports create, and a scan of every installed package for pydantic plugins, would be
        # most of its CPU time (`events --follow`, which lives on, turns the collector back on).
        gc.disable()
        os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    from jlm import logs
    from jlm.config import ConfigError, load, unknown_variable

    try:
        loaded = load()
    except ConfigError as exc:
        if args.json:
            print_error(True, "configuration", str(exc))
        else:
            logs.fatal(f"jlm: configuration error: {exc}")
        return EX_CONFIG
    settings = loaded.settings
    # Client commands print for people; their own connection chatter is noise. `--verbose` shows
    # it, and the AMQP library's records, which everyone else reports in their own words.
    daemon = args.command in ("run", "worker")
    level = settings.log_level if daemon else "DEBUG" if args.verbose else "WARNING"
    logs.setup(level, settings.log_format, library_logs=args.verbose)
    if daemon:
        from jlm import otel

        otel.configure()  # spans, when the [otel] extra is installed and OTEL_* ask for them
    if args.command == "check-config":
        from jlm.cli.check_config import check_config

        return check_config(loaded, args)
    for name in loaded.ignored:
        if daemon:  # a log record: JSON lines and journal priorities like the rest of its log
            logging.getLogger("jlm.config").warning("%s", unknown_variable(name))
        else:
            print(f"jlm: warning: {unknown_variable(name)}", file=sys.stderr)
    from jlm.cli.requests import request

    handlers = {"run": _run, "events": _events, "worker": _worker}
    handler = handlers.get(args.command, request)
    from jlm.errors import Refused, Unavailable

    try:
        return handler(settings, args)
    except Refused as exc:
        return fail(args, "refused", exc.message, EX_CONFIG)
    except Unavailable as exc:
        return fail(args, "unavailable", exc.message, EX_UNAVAILABLE)
    except KeyboardInterrupt:
        return 130


def _run(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from jlm import logs
    from jlm.cli.aio import asyncio_run
    from jlm.errors import Refused
    from jlm.service import Service

    async def go() -> int:
        await Service(settings).run()
        return EX_OK

    try:
        return asyncio_run(go())
    except OSError as exc:
        logs.fatal(f"jlm: cannot start: {exc}")
        return EX_UNAVAILABLE
    except BaseExceptionGroup as group:  # the service's task group wraps what ends it
        refused = group.subgroup(Refused)
        if refused is None:
            return _defect(group)
        # Logging is set up: the daemon's last word is a record like the others (JSON, journal).
        logging.getLogger("jlm.service").error("cannot start: %s", _first(refused).message)
        return EX_CONFIG
    except (Exception, asyncio.CancelledError) as exc:  # a cancellation nobody asked for too
        return _defect(exc)


def _defect(exc: BaseException) -> int:
    """A defect ended the daemon: its traceback as one record like the others (JSON, journal),
    not loose lines on stderr, and exit 70 (EX_SOFTWARE), which the unit restarts."""
    logging.getLogger("jlm.service").critical(
        "stopped by an unexpected error: %s: %s", type(exc).__name__, exc, exc_info=exc
    )
    return EX_SOFTWARE


def _first(group: BaseExceptionGroup[Refused]) -> Refused:
    inner = group.exceptions[0]
    return _first(inner) if isinstance(inner, BaseExceptionGroup) else inner


def _events(settings: Settings, args: argparse.Namespace) -> int:
    from jlm.cli.aio import amqp_errors, asyncio_run
    from jlm.events import Filter, parse_since, print_events

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        return fail(args, "usage", str(exc), EX_USAGE)
    only = Filter(args.job, args.request, args.scope, args.type)
    if args.follow:
        gc.enable()
    coro = print_events(settings, follow=args.follow, as_json=args.json, since=since, only=only)
    return asyncio_run(amqp_errors(args, coro), fast=True)


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from jlm.cli.aio import asyncio_run
    from jlm.worker.cli import run_worker_cli

    return asyncio_run(run_worker_cli(settings, args.target, args.job_type, args.concurrency))
