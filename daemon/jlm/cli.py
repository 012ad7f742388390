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
import time
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, NoReturn

import orjson

from jlm import __version__

if TYPE_CHECKING:
    from jlm.client import Client
    from jlm.config import Loaded, Settings
    from jlm.errors import Refused

EX_OK, EX_ERROR, EX_USAGE, EX_UNAVAILABLE, EX_CONFIG = 0, 1, 2, 69, 78
FINAL_STATES = ("succeeded", "failed", "cancelled")
# What to try next, after the daemon's error code.
HINTS = {
    "unknown_job_type": "the configured job types: `jlm check-config`",
    "not_found": "jobs expire; `jlm events --job ID --since 1d` shows what happened to one",
    "forbidden": "the grants are the [auth] tables of JLM_CONFIG: `jlm check-config`",
}


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as a JSON object when `--json` is on the line."""

    def error(self, message: str) -> NoReturn:
        if "--json" in sys.argv[1:]:
            _print_error(True, "usage", f"{self.prog}: {message}")
            self.exit(EX_USAGE)
        super().error(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="jlm",
        description="job-lifecycle-manager: deduplicating job lifecycle daemon",
    )
    p.add_argument("--version", action="version", version=f"jlm {__version__}")
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
    c.add_argument("--policy", choices=("replace", "skip", "reuse"))
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
    c = cmd("worker", "run a worker: MODULE:FUNCTION handles jobs of one type", timeout=False)
    c.add_argument("target", metavar="MODULE:FUNCTION")
    c.add_argument("--job-type", required=True)
    c.add_argument("--concurrency", type=int, default=1)
    cmd(
        "check-config",
        "validate the settings and print each with its source (default, env, file, credential)"
        " and secrets hidden",
        timeout=False,
    )
    c = cmd("completion", "print a shell completion script", timeout=False)
    c.add_argument("shell", choices=("bash", "zsh", "fish"))
    return p


def main(argv: list[str] | None = None) -> int:
    """`jlm ...`: the exit code. Run on the process's own command line (`argv` None), a client
    command ends the process itself once its output is flushed: nothing is left to clean up, and
    the interpreter's teardown of every imported module would cost a quarter of its CPU time."""
    parser = _parser()
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
            _print_error(True, "configuration", str(exc))
        else:
            logs.fatal(f"jlm: configuration error: {exc}")
        return EX_CONFIG
    settings = loaded.settings
    # Client commands print for people; their own connection chatter is noise. `--verbose` shows
    # it, and the AMQP library's records, which everyone else reports in their own words.
    daemon = args.command in ("run", "worker")
    level = settings.log_level if daemon else "DEBUG" if args.verbose else "WARNING"
    logs.setup(level, settings.log_format, library_logs=args.verbose)
    if args.command == "check-config":
        return _check_config(loaded, args)
    for name in loaded.ignored:
        if daemon:  # a log record: JSON lines and journal priorities like the rest of its log
            logging.getLogger("jlm.config").warning("%s", unknown_variable(name))
        else:
            print(f"jlm: warning: {unknown_variable(name)}", file=sys.stderr)
    handlers = {"run": _run, "events": _events, "worker": _worker}
    handler = handlers.get(args.command, _request)
    from jlm.errors import Refused, Unavailable

    try:
        return handler(settings, args)
    except Refused as exc:
        return _fail(args, "refused", exc.message, EX_CONFIG)
    except Unavailable as exc:
        return _fail(args, "unavailable", exc.message, EX_UNAVAILABLE)
    except KeyboardInterrupt:
        return 130


def _print_error(as_json: bool, code: str, message: str) -> None:
    from jlm.config import redact_url

    message = " ".join(redact_url(message).split())
    if as_json:
        error = {"success": False, "error": {"code": code, "message": message}}
        print(orjson.dumps(error).decode(), flush=True)
    else:
        print(f"jlm: {code}: {message}", file=sys.stderr, flush=True)


def _fail(args: argparse.Namespace, code: str, message: str, exit_code: int) -> int:
    """One line (or one JSON object under --json) for an error; the exit code to return."""
    _print_error(getattr(args, "json", False), code, message)
    return exit_code


def _asyncio_run(coro: Coroutine[Any, Any, int], *, fast: bool = False) -> int:
    """Run `coro`: on uvloop for the long-running daemon and worker, on asyncio's own loop for
    the short client commands (`fast`: uvloop's import costs more than it saves there)."""
    import asyncio

    if fast:
        return asyncio.run(coro)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from jlm import logs
    from jlm.errors import Refused
    from jlm.service import Service

    async def go() -> int:
        await Service(settings).run()
        return EX_OK

    try:
        return _asyncio_run(go())
    except OSError as exc:
        logs.fatal(f"jlm: cannot start: {exc}")
        return EX_UNAVAILABLE
    except BaseExceptionGroup as group:  # the service's task group wraps what ends it
        refused = group.subgroup(Refused)
        if refused is None:
            raise
        # Logging is set up: the daemon's last word is a record like the others (JSON, journal).
        logging.getLogger("jlm.service").error("cannot start: %s", _first(refused).message)
        return EX_CONFIG


def _first(group: BaseExceptionGroup[Refused]) -> Refused:
    inner = group.exceptions[0]
    return _first(inner) if isinstance(inner, BaseExceptionGroup) else inner


def _check_config(loaded: Loaded, args: argparse.Namespace) -> int:
    """Every setting with its value (passwords hidden) and where it came from."""
    from jlm.config import redact_url, unknown_variable

    values = _setting_values(loaded.settings)
    if args.json:
        info: dict[str, Any] = dict(values)
        info["amqp_urls"] = [redact_url(u) for u in loaded.settings.amqp_urls]
        info["sources"] = {
            key: {"source": source.kind, "origin": source.origin}
            for key, source in loaded.sources.items()
        }
        info["ignored"] = list(loaded.ignored)
        info["warnings"] = [unknown_variable(name) for name in loaded.ignored]
        print(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode())
        return EX_OK
    rows = _text_rows(values)
    width = max(len(label) for _, label, _ in rows)
    for key, label, value in rows:
        source = loaded.sources[key]
        origin = f"  ({source.origin})" if source.kind in ("file", "credential") else ""
        print(f"{label:<{width}}  {source.kind:<10}  {_shown(value)}{origin}")
    for name in loaded.ignored:
        print(f"jlm: warning: {unknown_variable(name)}", file=sys.stderr)
    print("configuration OK")
    return EX_OK


def _text_rows(values: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(setting, label, value): the environment's settings by variable name, the file's keys by
    name, with one row per job type (`job_types."a"`) and per grant (`auth.users."u"`)."""
    from jlm.config import ENV_SETTINGS, env_name

    rows: list[tuple[str, str, Any]] = []
    for key, value in values.items():
        if key in ENV_SETTINGS:
            rows.append((key, env_name(key), value))
        elif key == "job_types" and value:
            rows += [(key, f'job_types."{name}"', item) for name, item in value.items()]
        elif key == "auth":
            for sub, item in value.items():
                if sub == "users" and item:
                    rows += [(key, f'auth.users."{user}"', grant) for user, grant in item.items()]
                else:
                    rows.append((key, f"auth.{sub}", item))
        else:
            rows.append((key, key, value))
    return rows


def _setting_values(settings: Settings) -> dict[str, Any]:
    """Each setting by name as JSON, passwords hidden: the environment's, then the file's."""
    from jlm.config import ENV_SETTINGS, FileConfig

    values = {name: _json_value(getattr(settings, name)) for name in ENV_SETTINGS}
    f = settings.file
    for key in FileConfig.model_fields:
        if key == "job_types":
            values[key] = {
                k: v.model_dump(mode="json") | {"queue": f.queue_for(k)}
                for k, v in f.job_types.items()
            }
        else:
            values[key] = _json_value(getattr(f, key))
    return values


def _json_value(value: Any) -> Any:
    from pydantic import BaseModel

    from jlm.config import redact_url

    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, str):
        return redact_url(value)
    if value is None or isinstance(value, bool | int | float | dict | list):
        return value
    return str(value)


def _shown(value: Any) -> str:
    """A value as text: booleans as in the environment, tables as compact JSON."""
    from jlm.config import redact_url

    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return redact_url(orjson.dumps(value).decode())
    return redact_url(str(value))


def _request(settings: Settings, args: argparse.Namespace) -> int:
    body = _request_body(args)
    if isinstance(body, str):
        return _fail(args, "usage", body, EX_USAGE)
    return _asyncio_run(_amqp_errors(args, _ask(settings, args, *body)), fast=True)


async def _amqp_errors(args: argparse.Namespace, work: Coroutine[Any, Any, int]) -> int:
    """`work`, with what the broker refuses on a channel (a permission, a closed session) as one
    line: 78 for a permission, 69 for the rest."""
    from aiormq.exceptions import AMQPError, ChannelAccessRefused

    from jlm.amqp.connect import why

    try:
        return await work
    except ChannelAccessRefused as exc:
        message = f"rabbitmq: {why(exc)} (check the user's permissions on this virtual host)"
        return _fail(args, "refused", message, EX_CONFIG)
    except (AMQPError, ConnectionError) as exc:
        message = f"rabbitmq: {type(exc).__name__}: {why(exc)}"
        return _fail(args, "unavailable", message, EX_UNAVAILABLE)


async def _ask(settings: Settings, args: argparse.Namespace, op: str, body: dict[str, Any]) -> int:
    from jlm.amqp.names import REQUESTS
    from jlm.client import Client, url_user, url_vhost

    # Name ourselves (RabbitMQ checks user_id against the connection's user), so that a daemon
    # with authorisation on knows who asks.
    async with Client(settings, user_id=url_user(settings)) as client:
        consumers = await client.consumers()
        vhost = url_vhost(settings)
        if consumers is None:
            return _fail(
                args,
                "no_daemon",
                f"{REQUESTS} does not exist on virtual host {vhost!r}: no daemon has run here; "
                "start one with `jlm run` (nothing was sent)",
                EX_UNAVAILABLE,
            )
        anyway = getattr(args, "queue_anyway", False)
        if consumers == 0 and not anyway:
            more = " or add --queue-anyway" if hasattr(args, "queue_anyway") else ""
            return _fail(
                args,
                "no_daemon",
                f"no daemon consumes {REQUESTS} on virtual host {vhost!r}: nothing was sent; "
                f"start one with `jlm run`{more}",
                EX_UNAVAILABLE,
            )
        if args.command == "submit" and args.no_wait:
            return await _fire(client, args, op, body)
        message_id = uuid.uuid4().hex
        try:
            reply = await client.call(op, body, timeout=args.timeout, message_id=message_id)
        except TimeoutError:
            return _fail(
                args,
                "timeout",
                f"no reply within {args.timeout:g}s: the request is still queued in {REQUESTS} "
                "and will be applied when a daemon consumes it "
                f"(`jlm events --follow --request {message_id}` shows when)",
                EX_UNAVAILABLE,
            )
        if not reply.get("success"):
            error = reply.get("error", {})
            code = error.get("code", "internal")
            hint = HINTS.get(code)
            message = error.get("message", "") + (f" ({hint})" if hint else "")
            return _fail(args, code, message, EX_ERROR)
        if args.command == "submit" and args.until_done:
            reply = await _until_done(client, reply, args)
            if not reply.get("success"):
                error = reply["error"]
                return _fail(args, error["code"], error["message"], EX_UNAVAILABLE)
        _out(args, reply, _describe(args.command, reply))
        return EX_OK


async def _fire(client: Client, args: argparse.Namespace, op: str, body: dict[str, Any]) -> int:
    """`submit --no-wait`: publish (confirmed by the broker), say how to see the decision."""
    message_id = uuid.uuid4().hex
    await client.send(op, body, wait=False, message_id=message_id)
    see = f"jlm events --since 5m --request {message_id}"
    reply = {"success": True, "submitted": True, "decided": False, "request_id": message_id}
    _out(
        args,
        reply,
        f"request {message_id} published; not waiting for the daemon's decision, so a rejection "
        f"is not shown here: `{see}` shows the outcome",
    )
    return EX_OK


def _request_body(args: argparse.Namespace) -> tuple[str, dict[str, Any]] | str:
    """The operation and body of a request, or the usage error."""
    if args.command == "submit":
        try:
            payload = orjson.loads(args.payload)
        except orjson.JSONDecodeError as exc:
            return f"--payload is not JSON: {exc}"
        if not isinstance(payload, dict):
            return "--payload must be a JSON object, e.g. '{\"x\": 1}'"
        now = time.time()
        body: dict[str, Any] = {
            "job_type": args.job_type,
            "payload": payload,
            "cache_prefix": args.prefix,
            "priority": args.priority,
            "cancel_running": args.cancel_running,
            "requested_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now * 1e6) % 1_000_000:06d}Z",
        }
        if args.policy:
            body["policy"] = args.policy
        return "manage", body
    if args.command == "cancel":
        return "cancel", {"job_id": args.job_id, "running": args.running}
    if args.command == "status":
        return "status", {"job_id": args.job_id}
    assert args.command in ("invalidate", "result")
    return args.command, {"job_type": args.job_type, "cache_prefix": args.prefix}


async def _until_done(
    client: Client, reply: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Poll the job's status until a final state; on a terminal, show each change on stderr."""
    import asyncio

    job_id = reply["new_job_id"]
    started = time.monotonic()
    deadline = started + args.timeout
    state = reply.get("state")
    show = sys.stderr.isatty() and not args.json
    if show:
        print(f"jlm: job {job_id}: {state}", file=sys.stderr, flush=True)
    status: dict[str, Any] = {}
    while state not in FINAL_STATES and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        status = await client.call("status", {"job_id": job_id}, timeout=args.timeout)
        if status.get("state") != state:
            state = status.get("state")
            if show:
                took = time.monotonic() - started
                print(f"jlm: job {job_id}: {state} ({took:.1f}s)", file=sys.stderr, flush=True)
        elif show:
            took = time.monotonic() - started
            print(f"\rjlm: {state}, {took:.0f}s", end="", file=sys.stderr, flush=True)
    out = dict(reply, state=state)
    if state == "succeeded":
        res = await client.call("result", {"job_type": args.job_type, "cache_prefix": args.prefix})
        if res.get("job_id") == job_id:
            out["result"] = res.get("result")
    elif state not in FINAL_STATES:
        out["success"] = False
        out["error"] = {
            "code": "timeout",
            "message": f"job {job_id} still {state} after {args.timeout:g}s; it goes on: "
            f"`jlm status {job_id}` shows it",
        }
    elif status.get("error"):
        out["job_error"] = status["error"]
    return out


def _describe(command: str, r: dict[str, Any]) -> str:
    if command == "submit":
        lines = [
            f"job        {r.get('new_job_id')} ({r.get('state')})",
            f"previous   {r.get('previous_job_id') or '-'}",
            f"deduplicated {str(r.get('deduplicated')).lower()}, stale_cancelled "
            f"{str(r.get('stale_cancelled')).lower()}, cache_invalidated "
            f"{str(r.get('cache_invalidated')).lower()}",
            f"provenance {r.get('provenance_id')}",
        ]
        if r.get("running_cancelled"):
            lines.append("running    the running job was stopped (--cancel-running)")
        if "result" in r:
            lines.append(f"result     {orjson.dumps(r['result']).decode()}")
        if r.get("job_error"):
            lines.append(f"error      {r['job_error']}")
        return "\n".join(lines)
    if command == "status":
        head = [
            f"job      {r['job_id']}",
            f"state    {r['state']}",
            f"scope    {r['cache_prefix']}/{r['job_type']}  priority {r['priority']}",
            f"created  {r['created_at']}",
            f"updated  {r['updated_at']}",
        ]
        if r.get("superseded_by"):
            head.append(f"superseded by {r['superseded_by']}")
        head += [f"  {h['at']}  {h['state']:<10} {h.get('reason') or ''}" for h in r["history"]]
        return "\n".join(head)
    if command == "cancel":
        done = "cancelled" if r["cancelled"] else "not cancelled"
        hint = (
            ": add --running to stop it" if r["state"] == "running" and not r["cancelled"] else ""
        )
        return f"job {r['job_id']}: {done} ({r['state']}){hint}"
    if command == "invalidate":
        return "cache invalidated" if r["cache_invalidated"] else "nothing was cached"
    if command == "result":
        if not r["cached"]:
            return "no cached result"
        return (
            f"job {r['job_id']}\n{orjson.dumps(r['result'], option=orjson.OPT_INDENT_2).decode()}"
        )
    return orjson.dumps(r).decode()


def _out(args: argparse.Namespace, reply: dict[str, Any], text: str) -> None:
    print(orjson.dumps(reply).decode() if args.json else text)


def _events(settings: Settings, args: argparse.Namespace) -> int:
    from jlm.events import Filter, parse_since, print_events

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        return _fail(args, "usage", str(exc), EX_USAGE)
    only = Filter(args.job, args.request, args.scope, args.type)
    if args.follow:
        gc.enable()
    coro = print_events(settings, follow=args.follow, as_json=args.json, since=since, only=only)
    return _asyncio_run(_amqp_errors(args, coro), fast=True)


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from jlm.worker.cli import run_worker_cli

    return _asyncio_run(run_worker_cli(settings, args.target, args.job_type, args.concurrency))
