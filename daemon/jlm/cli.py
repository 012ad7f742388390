"""The `jlm` command line: run the daemon, talk to it, run a worker, check the configuration."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Coroutine
from typing import Any

import orjson
from pydantic import BaseModel

from jlm import __version__, logs
from jlm.config import (
    ENV_SETTINGS,
    OPERATIONS,
    ConfigError,
    FileConfig,
    Loaded,
    Settings,
    env_name,
    load,
    redact_url,
)
from jlm.errors import Unavailable

EX_OK, EX_ERROR, EX_USAGE, EX_UNAVAILABLE, EX_CONFIG = 0, 1, 2, 69, 78
FINAL_STATES = ("succeeded", "failed", "cancelled")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jlm",
        description="job-lifecycle-manager: deduplicating job lifecycle daemon",
    )
    p.add_argument("--version", action="version", version=f"jlm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_, description=help_)
        c.add_argument("--json", action="store_true", help="machine-readable output")
        c.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a reply")
        return c

    cmd("run", "run the daemon in the foreground")
    c = cmd("submit", "ask for a job (operation manage)")
    c.add_argument("job_type")
    c.add_argument("--payload", default="{}", help="JSON object (default {})")
    c.add_argument("--prefix", default="job", help="cache_prefix of the dedup scope")
    c.add_argument("--priority", type=int, default=5, help="1..10, 10 runs first")
    c.add_argument("--policy", choices=("replace", "skip", "reuse"))
    c.add_argument("--cancel-running", action="store_true")
    c.add_argument("--wait", action="store_true", help="wait for the daemon's reply")
    c.add_argument(
        "--until-done",
        action="store_true",
        help="also wait for the job's final state and print its result",
    )
    c = cmd("status", "show a job's state and history")
    c.add_argument("job_id")
    c = cmd("cancel", "cancel a job")
    c.add_argument("job_id")
    c.add_argument("--running", action="store_true", help="also stop it if it is running")
    c = cmd("invalidate", "drop a scope's cached result")
    c.add_argument("job_type")
    c.add_argument("--prefix", default="job")
    c = cmd("result", "show a scope's cached result")
    c.add_argument("job_type")
    c.add_argument("--prefix", default="job")
    c = cmd("events", "print the provenance stream")
    c.add_argument("--follow", action="store_true", help="keep reading new events")
    c = cmd("worker", "run a worker: MODULE:FUNCTION handles jobs of one type")
    c.add_argument("target", metavar="MODULE:FUNCTION")
    c.add_argument("--job-type", required=True)
    c.add_argument("--concurrency", type=int, default=1)
    cmd(
        "check-config",
        "validate the settings and print each with its source (default, env, file, credential)"
        " and secrets hidden",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        loaded = load()
    except ConfigError as exc:
        logs.fatal(f"jlm: configuration error: {exc}")
        return EX_CONFIG
    settings = loaded.settings
    # Client commands print for people; their own connection chatter is noise.
    quiet = args.command not in ("run", "worker")
    logs.setup("WARNING" if quiet else settings.log_level, settings.log_format)
    if args.command == "check-config":
        return _check_config(loaded, args)
    for name in loaded.ignored:
        logging.getLogger("jlm.config").warning("%s is not a setting: ignored", name)
    handlers = {"run": _run, "events": _events, "worker": _worker}
    handler = handlers.get(args.command, _request)
    try:
        return handler(settings, args)
    except Unavailable as exc:
        _err(args, "unavailable", exc.message)
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return 130


def _err(args: argparse.Namespace, code: str, message: str) -> None:
    message = redact_url(message)
    if getattr(args, "json", False):
        print(
            orjson.dumps({"success": False, "error": {"code": code, "message": message}}).decode()
        )
    else:
        print(f"jlm: {code}: {message}", file=sys.stderr)


def _asyncio_run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from jlm.service import Service

    async def go() -> int:
        await Service(settings).run()
        return EX_OK

    try:
        return _asyncio_run(go())
    except OSError as exc:
        logs.fatal(f"jlm: cannot start: {exc}")
        return EX_UNAVAILABLE


def _check_config(loaded: Loaded, args: argparse.Namespace) -> int:
    """Every setting with its value (passwords hidden) and where it came from."""
    values = _setting_values(loaded.settings)
    if args.json:
        info: dict[str, Any] = dict(values)
        info["amqp_urls"] = [redact_url(u) for u in loaded.settings.amqp_urls]
        info["sources"] = {
            key: {"source": source.kind, "origin": source.origin}
            for key, source in loaded.sources.items()
        }
        info["ignored"] = list(loaded.ignored)
        print(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode())
        return EX_OK
    rows = _text_rows(values)
    width = max(len(label) for _, label, _ in rows)
    for key, label, value in rows:
        source = loaded.sources[key]
        origin = f"  ({source.origin})" if source.kind in ("file", "credential") else ""
        print(f"{label:<{width}}  {source.kind:<10}  {_shown(value)}{origin}")
    for name in loaded.ignored:
        print(f"jlm: {name} is not a setting: ignored", file=sys.stderr)
    print("configuration OK")
    return EX_OK


def _text_rows(values: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(setting, label, value): the environment's settings by variable name, the file's keys by
    name, with one row per job type (`job_types."a"`) and per grant (`auth.users."u"`)."""
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
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, str):
        return redact_url(value)
    if value is None or isinstance(value, bool | int | float | dict | list):
        return value
    return str(value)


def _shown(value: Any) -> str:
    """A value as text: booleans as in the environment, tables as compact JSON."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return redact_url(orjson.dumps(value).decode())
    return redact_url(str(value))


def _request(settings: Settings, args: argparse.Namespace) -> int:
    from jlm.client import Client, url_user

    op, body = _request_body(args)
    if op is None:
        return EX_USAGE

    async def go() -> int:
        # Name ourselves (RabbitMQ checks user_id against the connection's user), so that a
        # daemon with authorisation on knows who asks.
        async with Client(settings, user_id=url_user(settings)) as client:
            if args.command == "submit" and not (args.wait or args.until_done):
                await client.send(op, body, wait=False)
                _out(args, {"success": True, "submitted": True}, "request published")
                return EX_OK
            try:
                reply = await client.call(op, body, timeout=args.timeout)
            except TimeoutError:
                _err(args, "unavailable", f"no reply within {args.timeout:.0f}s: is `jlm run` up?")
                return EX_UNAVAILABLE
            if not reply.get("success"):
                error = reply.get("error", {})
                _err(args, error.get("code", "internal"), error.get("message", ""))
                return EX_ERROR
            if args.command == "submit" and args.until_done:
                reply = await _until_done(client, reply, args)
            _out(args, reply, _describe(args.command, reply))
            return EX_OK if reply.get("success") else EX_ERROR

    return _asyncio_run(go())


def _request_body(args: argparse.Namespace) -> tuple[str | None, dict[str, Any]]:
    if args.command == "submit":
        try:
            payload = orjson.loads(args.payload)
        except orjson.JSONDecodeError as exc:
            print(f"jlm: --payload is not JSON: {exc}", file=sys.stderr)
            return None, {}
        body: dict[str, Any] = {
            "job_type": args.job_type,
            "payload": payload,
            "cache_prefix": args.prefix,
            "priority": args.priority,
            "cancel_running": args.cancel_running,
            "requested_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            + f".{int(time.time() * 1e6) % 1_000_000:06d}Z",
        }
        if args.policy:
            body["policy"] = args.policy
        return "manage", body
    if args.command == "cancel":
        return "cancel", {"job_id": args.job_id, "running": args.running}
    if args.command == "status":
        return "status", {"job_id": args.job_id}
    assert args.command in OPERATIONS
    return args.command, {"job_type": args.job_type, "cache_prefix": args.prefix}


async def _until_done(
    client: Any, reply: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    job_id = reply["new_job_id"]
    deadline = time.monotonic() + args.timeout
    state = reply.get("state")
    status: dict[str, Any] = {}
    while state not in FINAL_STATES and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        status = await client.call("status", {"job_id": job_id}, timeout=args.timeout)
        state = status.get("state")
    out = dict(reply, state=state)
    if state == "succeeded":
        res = await client.call("result", {"job_type": args.job_type, "cache_prefix": args.prefix})
        if res.get("job_id") == job_id:
            out["result"] = res.get("result")
    elif state not in FINAL_STATES:
        out["success"] = False
        out["error"] = {
            "code": "unavailable",
            "message": f"job still {state} after {args.timeout}s",
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
        if "result" in r:
            lines.append(f"result     {orjson.dumps(r['result']).decode()}")
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
        return f"job {r['job_id']}: {done} ({r['state']})"
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
    from jlm.events import print_events

    return _asyncio_run(print_events(settings, follow=args.follow, as_json=args.json))


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from jlm.worker import run_worker_cli

    return _asyncio_run(run_worker_cli(settings, args.target, args.job_type, args.concurrency))
