"""The command line's grammar: every subcommand and option of `jlm`."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from jlm.cli.output import EX_USAGE, print_error


class _Version(argparse._VersionAction):
    """`--version`, with the version read (from the package's metadata) only when asked for."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        from jlm import __version__

        self.version = f"jlm {__version__}"
        super().__call__(parser, namespace, values, option_string)


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as a JSON object when `--json` is on the line."""

    def error(self, message: str) -> NoReturn:
        if "--json" in sys.argv[1:]:
            print_error(True, "usage", f"{self.prog}: {message}")
            self.exit(EX_USAGE)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="jlm",
        description="job-lifecycle-manager: deduplicating job lifecycle daemon",
    )
    p.add_argument("--version", action=_Version, version="jlm")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help_: str, *, timeout: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_, description=help_)
        c.add_argument("--json", action="store_true", help="machine-readable output")
        c.add_argument(
            "-v", "--verbose", action="store_true", help="also show the AMQP library's own logs"
        )
        if timeout:
            c.add_argument(
                "--timeout", type=float, default=30.0, help="seconds to wait for a reply"
            )
        return c

    def queue_anyway(c: argparse.ArgumentParser) -> None:
        c.add_argument(
            "--queue-anyway",
            action="store_true",
            help="publish even when no daemon consumes jlm.requests (applied when one starts)",
        )

    cmd("run", "run the daemon in the foreground", timeout=False)
    c = cmd("submit", "ask for a job (operation manage) and show the daemon's decision")
    c.add_argument("job_type")
    c.add_argument("--payload", default="{}", help="JSON object (default {})")
    c.add_argument("--prefix", default="job", help="cache_prefix of the dedup scope")
    c.add_argument("--priority", type=int, default=5, help="1..10, 10 runs first")
    c.add_argument("--policy", choices=("replace", "skip", "reuse", "debounce"))
    c.add_argument(
        "--debounce-ms", type=int, metavar="MS", help="policy debounce: publish after MS quiet"
    )
    c.add_argument(
        "--max-wait-ms", type=int, metavar="MS", help="policy debounce: wait at most MS in all"
    )
    c.add_argument(
        "--not-before",
        metavar="TIME|+30s",
        help="publish the job at this time, not before: RFC 3339, or +30s, +10m, +2h, +1d",
    )
    c.add_argument("--cancel-running", action="store_true", help="also stop a running job")
    wait = c.add_mutually_exclusive_group()
    wait.add_argument("--wait", action="store_true", help="wait for the reply (the default)")
    wait.add_argument(
        "--no-wait", action="store_true", help="publish and exit without the daemon's decision"
    )
    wait.add_argument(
        "--until-done",
        action="store_true",
        help="also wait for the job's final state and print its result",
    )
    queue_anyway(c)
    c = cmd("status", "show a job's state and history")
    c.add_argument("job_id")
    c = cmd("cancel", "cancel a job")
    c.add_argument("job_id")
    c.add_argument("--running", action="store_true", help="also stop it if it is running")
    queue_anyway(c)
    c = cmd("invalidate", "drop a scope's cached result")
    c.add_argument("job_type")
    c.add_argument("--prefix", default="job")
    queue_anyway(c)
    c = cmd("result", "show a scope's cached result")
    c.add_argument("job_type")
    c.add_argument("--prefix", default="job")
    c = cmd("events", "print the provenance stream", timeout=False)
    c.add_argument("--follow", action="store_true", help="print new events until Ctrl-C")
    c.add_argument("--since", metavar="10m|TIME", help="start at a time: 30s, 10m, 2h, 1d or ISO")
    c.add_argument("--job", metavar="JOB_ID", help="only this job's events")
    c.add_argument("--request", metavar="MESSAGE_ID", help="only this request's events")
    c.add_argument("--scope", metavar="PREFIX/TYPE", help="only this dedup scope's events")
    c.add_argument("--type", metavar="TYPE", help="only events of this type (a glob: 'job.*')")
    c = cmd(
        "worker",
        "run a worker: MODULE:APP serves the app's job types; MODULE:FUNCTION handles one type",
        timeout=False,
    )
    c.add_argument("target", metavar="MODULE[:APP]|MODULE:FUNCTION", help="MODULE alone: its `app`")
    c.add_argument(
        "--job-type", help="the job type (required with a function; with an app: only it)"
    )
    c.add_argument(
        "--concurrency", type=int, default=1, help="with a function (an app sets its own)"
    )
    cmd(
        "check-config",
        "validate the settings and print each with its source (default, env, file, credential)"
        " and secrets hidden",
        timeout=False,
    )
    c = cmd("completion", "print a shell completion script", timeout=False)
    c.add_argument("shell", choices=("bash", "zsh", "fish"))
    return p
