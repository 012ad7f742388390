"""Reading the provenance stream (`jlm events`)."""

from __future__ import annotations

import asyncio
import fnmatch
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import ChannelNotFoundEntity

from jlm.amqp.connect import connect_first
from jlm.amqp.names import PROVENANCE
from jlm.config import Settings
from jlm.errors import Unavailable

IDLE_SECONDS = 1.5
_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events to print: every given criterion must match."""

    job: str | None = None
    request: str | None = None
    scope: str | None = None  # "cache_prefix/job_type"
    type: str | None = None  # a name or a glob: `job.*`

    def matches(self, event: dict[str, Any]) -> bool:
        if self.job is not None and event.get("job_id") != self.job:
            return False
        if self.request is not None and event.get("request_id") != self.request:
            return False
        if self.scope is not None:
            s = event.get("scope") or {}
            if f"{s.get('cache_prefix')}/{s.get('job_type')}" != self.scope:
                return False
        return self.type is None or fnmatch.fnmatchcase(str(event.get("type")), self.type)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`10m`, `30s`, `2h`, `1d` ago, or an ISO 8601 time (UTC unless it names an offset)."""
    m = _AGO.fullmatch(text.strip())
    if m:
        ago = timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
        return (now or datetime.now(UTC)) - ago
    try:
        at = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--since {text!r}: use a duration (30s, 10m, 2h, 1d) or a time (2026-12-02T07:00:00Z)"
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


async def print_events(
    settings: Settings,
    *,
    follow: bool,
    as_json: bool,
    since: datetime | None = None,
    only: Filter | None = None,
) -> int:
    """Print what the stream holds, oldest first (from `since` when given); with `follow`, only
    events that arrive from now on (or from `since`), until interrupted.

    A stream never says "that was the last one" over AMQP, so without `--follow` reading stops
    once no event has arrived for IDLE_SECONDS.
    """
    only = only or Filter()
    offset: Any = since if since is not None else ("next" if follow else "first")
    conn = await connect_first(settings, "jlm events")
    loop = asyncio.get_running_loop()
    quiet = asyncio.Event()
    timer: asyncio.TimerHandle | None = None

    def rearm() -> None:
        nonlocal timer
        if timer is not None:
            timer.cancel()
        if not follow:
            timer = loop.call_later(IDLE_SECONDS, quiet.set)

    async with conn:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=500)
        try:
            queue = await channel.declare_queue(PROVENANCE, passive=True)
        except ChannelNotFoundEntity:
            raise Unavailable(
                f"the stream {PROVENANCE} does not exist on this virtual host: no daemon has "
                "run here yet (start one with `jlm run`)",
                "rabbitmq",
            ) from None

        async def on_event(message: AbstractIncomingMessage) -> None:
            rearm()
            await message.ack()
            try:
                event = orjson.loads(message.body)
            except orjson.JSONDecodeError:
                event = None
            if isinstance(event, dict) and not only.matches(event):
                return
            print(message.body.decode() if as_json else _line(message.body), flush=True)

        rearm()
        await queue.consume(on_event, arguments={"x-stream-offset": offset})
        if follow:  # on stderr: stdout stays events only
            print(f"jlm: following {PROVENANCE}; Ctrl-C stops", file=sys.stderr, flush=True)
        await quiet.wait()
    return 0


def _line(body: bytes) -> str:
    try:
        e = orjson.loads(body)
        scope = e.get("scope") or {}
        where = f"{scope.get('cache_prefix')}/{scope.get('job_type')}" if scope else "-"
        return (
            f"{e.get('at')}  {e.get('type'):<18} {e.get('status'):<10} "
            f"{e.get('job_id') or '-':<43} {where}  actor={e.get('actor') or '-'}"
        )
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return body.decode(errors="replace")
