"""What a command prints: its reply as text or JSON, an error as one line, and the exit codes."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

EX_OK, EX_ERROR, EX_USAGE, EX_UNAVAILABLE, EX_SOFTWARE, EX_CONFIG = 0, 1, 2, 69, 70, 78


def print_error(as_json: bool, code: str, message: str) -> None:
    from jlm.config import redact_url

    message = " ".join(redact_url(message).split())
    if as_json:
        error = {"success": False, "error": {"code": code, "message": message}}
        print(orjson.dumps(error).decode(), flush=True)
    else:
        print(f"jlm: {code}: {message}", file=sys.stderr, flush=True)


def fail(args: argparse.Namespace, code: str, message: str, exit_code: int) -> int:
    """One line (or one JSON object under --json) for an error; the exit code to return."""
    print_error(getattr(args, "json", False), code, message)
    return exit_code


def out(args: argparse.Namespace, reply: dict[str, Any], text: str) -> None:
    print(orjson.dumps(reply).decode() if args.json else text)


def progress_line(p: dict[str, Any]) -> str:
    """`40% page 3 of 8 (at 2026-12-02T10:00:00.123456Z)`."""
    text = f"{float(p.get('fraction', 0)) * 100:.0f}%"
    if p.get("message"):
        text += f" {p['message']}"
    return f"{text} (at {p.get('at')})"


def _describe_submit(r: dict[str, Any]) -> str:
    lines = [
        f"job        {r.get('new_job_id')} ({r.get('state')})",
        f"previous   {r.get('previous_job_id') or '-'}",
        f"deduplicated {str(r.get('deduplicated')).lower()}, stale_cancelled "
        f"{str(r.get('stale_cancelled')).lower()}, cache_invalidated "
        f"{str(r.get('cache_invalidated')).lower()}",
        f"provenance {r.get('provenance_id')}",
    ]
    if r.get("due_at"):
        lines.append(f"due        {r['due_at']} (scheduled: published then, not before)")
    if r.get("running_cancelled"):
        lines.append("running    the running job was stopped (--cancel-running)")
    if "result" in r:
        lines.append(f"result     {orjson.dumps(r['result']).decode()}")
    if r.get("job_error"):
        lines.append(f"error      {r['job_error']}")
    return "\n".join(lines)


def describe(command: str, r: dict[str, Any]) -> str:
    if command == "submit":
        return _describe_submit(r)
    if command == "status":
        head = [
            f"job      {r['job_id']}",
            f"state    {r['state']}",
            f"scope    {r['cache_prefix']}/{r['job_type']}  priority {r['priority']}",
            f"created  {r['created_at']}",
            f"updated  {r['updated_at']}",
        ]
        if r.get("due_at"):
            when = "due" if r["state"] == "scheduled" else "was due"
            head.append(f"{when:<8} {r['due_at']}")
        if r.get("superseded_by"):
            head.append(f"superseded by {r['superseded_by']}")
        if r.get("progress"):
            head.append(f"progress {progress_line(r['progress'])}")
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
