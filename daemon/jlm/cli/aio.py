"""Running a command's coroutine: the event loop, and the broker's channel errors as one line."""

from __future__ import annotations

import argparse
from collections.abc import Coroutine
from typing import Any

from jlm.cli.output import EX_CONFIG, EX_UNAVAILABLE, fail


def asyncio_run(coro: Coroutine[Any, Any, int], *, fast: bool = False) -> int:
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


async def amqp_errors(args: argparse.Namespace, work: Coroutine[Any, Any, int]) -> int:
    """`work`, with what the broker refuses on a channel (a permission, a closed session) as one
    line: 78 for a permission, 69 for the rest."""
    from aiormq.exceptions import AMQPError, ChannelAccessRefused

    from jlm.amqp.connect import why

    try:
        return await work
    except ChannelAccessRefused as exc:
        message = f"rabbitmq: {why(exc)} (check the user's permissions on this virtual host)"
        return fail(args, "refused", message, EX_CONFIG)
    except (AMQPError, ConnectionError) as exc:
        message = f"rabbitmq: {type(exc).__name__}: {why(exc)}"
        return fail(args, "unavailable", message, EX_UNAVAILABLE)
