"""The request commands (`submit`, `status`, `cancel`, `invalidate`, `result`): one request to the
daemon and its reply."""

from __future__ import annotations

import argparse
import re
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from jlm.cli.aio import amqp_errors, asyncio_run
from jlm.cli.output import (
    EX_CONFIG,
    EX_ERROR,
    EX_OK,
    EX_UNAVAILABLE,
    EX_USAGE,
    describe,
    fail,
    out,
    progress_line,
)

if TYPE_CHECKING:
    from jlm.client import JobsClient
    from jlm.config import Settings


FINAL_STATES = ("succeeded", "failed", "cancelled")
# What to try next, after the daemon's error code.
HINTS = {
    "unknown_job_type": "the configured job types: `jlm check-config`",
    "not_found": "jobs expire; `jlm events --job ID --since 1d` shows what happened to one",
    "forbidden": "the grants are the [auth] tables of JLM_CONFIG: `jlm check-config`",
}


def request(settings: Settings, args: argparse.Namespace) -> int:
    body = _request_body(args)
    if isinstance(body, str):
        return fail(args, "usage", body, EX_USAGE)
    return asyncio_run(amqp_errors(args, _ask(settings, args, *body)), fast=True)


async def _ask(settings: Settings, args: argparse.Namespace, op: str, body: dict[str, Any]) -> int:
    from jlm.client import JobsClient, url_user
    from jlm.client_errors import BrokerUnavailable

    # Name ourselves (RabbitMQ checks user_id against the connection's user), so that a daemon
    # with authorisation on knows who asks.
    client = JobsClient(
        settings.amqp_url, settings=settings, user_id=url_user(settings), timeout=args.timeout
    )
    try:
        async with client:
            return await _ask_daemon(client, settings, args, op, body)
    except BrokerUnavailable as exc:
        if exc.refused:  # a login, a virtual host, a permission: only the settings can help
            return fail(args, "refused", exc.message, EX_CONFIG)
        return fail(args, "unavailable", exc.message, EX_UNAVAILABLE)


async def _ask_daemon(
    client: JobsClient,
    settings: Settings,
    args: argparse.Namespace,
    op: str,
    body: dict[str, Any],
) -> int:
    from jlm.amqp.names import REQUESTS
    from jlm.client import url_vhost
    from jlm.client_errors import ReplyTimeout, RequestFailed

    consumers = await client.consumers()
    vhost = url_vhost(settings)
    if consumers is None:
        return fail(
            args,
            "no_daemon",
            f"{REQUESTS} does not exist on virtual host {vhost!r}: no daemon has run here; "
            "start one with `jlm run` (nothing was sent)",
            EX_UNAVAILABLE,
        )
    anyway = getattr(args, "queue_anyway", False)
    if consumers == 0 and not anyway:
        more = " or add --queue-anyway" if hasattr(args, "queue_anyway") else ""
        return fail(
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
        reply = await client.request(op, body, message_id=message_id)
    except ReplyTimeout:
        return fail(
            args,
            "timeout",
            f"no reply within {args.timeout:g}s: the request is still queued in {REQUESTS} "
            "and will be applied when a daemon consumes it "
            f"(`jlm events --follow --request {message_id}` shows when)",
            EX_UNAVAILABLE,
        )
    except RequestFailed as exc:
        hint = HINTS.get(exc.code)
        return fail(args, exc.code, exc.message + (f" ({hint})" if hint else ""), EX_ERROR)
    if args.command == "submit" and args.until_done:
        reply = await _until_done(client, reply, args)
        if not reply.get("success"):
            error = reply["error"]
            return fail(args, error["code"], error["message"], EX_UNAVAILABLE)
    out(args, reply, describe(args.command, reply))
    return EX_OK


async def _fire(client: JobsClient, args: argparse.Namespace, op: str, body: dict[str, Any]) -> int:
    """`submit --no-wait`: publish (confirmed by the broker), say how to see the decision."""
    message_id = await client.send(op, body)
    see = f"jlm events --since 5m --request {message_id}"
    reply = {"success": True, "submitted": True, "decided": False, "request_id": message_id}
    out(
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
        for name in ("debounce_ms", "max_wait_ms"):
            if getattr(args, name) is not None:
                body[name] = getattr(args, name)
        if args.not_before:
            try:
                body["not_before"] = not_before(args.not_before, now)
            except ValueError as exc:
                return str(exc)
        return "manage", body
    if args.command == "cancel":
        return "cancel", {"job_id": args.job_id, "running": args.running}
    if args.command == "status":
        return "status", {"job_id": args.job_id}
    assert args.command in ("invalidate", "result")
    return args.command, {"job_type": args.job_type, "cache_prefix": args.prefix}


def not_before(text: str, now: float) -> str:
    """`--not-before`: an RFC 3339 time as given, or `+30s`, `+10m`, `+2h`, `+1d` from `now`."""
    text = text.strip()
    m = re.fullmatch(r"\+(\d+(?:\.\d+)?)(ms|s|m|h|d)", text)
    if m is not None:
        at = datetime.fromtimestamp(now + float(m.group(1)) * _SECONDS[m.group(2)], UTC)
        return at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None or "T" not in text.upper():
        raise ValueError(
            f"--not-before {text!r}: use +30s, +10m, +2h, +1d or a time with its offset "
            "(2026-12-02T07:00:00Z)"
        )
    return text


_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


async def _until_done(
    client: JobsClient, reply: dict[str, Any], args: argparse.Namespace
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
    progress: dict[str, Any] | None = None
    while state not in FINAL_STATES and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        status = await _reply(client, "status", {"job_id": job_id})
        if show and status.get("progress") and status["progress"] != progress:
            progress = status["progress"]
            took = time.monotonic() - started
            line = progress_line(progress)
            print(f"\rjlm: job {job_id}: {line} ({took:.1f}s)", file=sys.stderr, flush=True)
        if status.get("state") != state:
            state = status.get("state")
            if show:
                took = time.monotonic() - started
                print(f"jlm: job {job_id}: {state} ({took:.1f}s)", file=sys.stderr, flush=True)
        elif show:
            took = time.monotonic() - started
            print(f"\rjlm: {state}, {took:.0f}s", end="", file=sys.stderr, flush=True)
    out = dict(reply, state=state)
    if progress is not None or status.get("progress"):
        out["progress"] = status.get("progress") or progress
    if state == "succeeded":
        res = await _reply(
            client, "result", {"job_type": args.job_type, "cache_prefix": args.prefix}
        )
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


async def _reply(client: JobsClient, op: str, body: dict[str, Any]) -> dict[str, Any]:
    """The reply as a dict, an error reply included (polling goes on past one)."""
    from jlm.client_errors import RequestFailed

    try:
        return await client.request(op, body)
    except RequestFailed as exc:
        return {"success": False, "error": {"code": exc.code, "message": exc.message}}
