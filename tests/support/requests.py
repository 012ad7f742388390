"""Requests as publishers send them: the message on jlm.requests with its properties."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson

REQUESTS = "jlm.requests"


def rfc3339(ts: datetime) -> str:
    """A `requested_at` value: UTC, microseconds, `Z`."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def request_message(
    body: bytes | dict[str, Any],
    *,
    message_id: str | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    user_id: str | None = None,
    headers: dict[str, Any] | None = None,
    content_type: str | None = "application/json",
    persistent: bool = True,
) -> aio_pika.Message:
    """One request message (publish it to jlm.requests with the operation as routing key).

    `body`: the bytes as sent, or a dict sent as JSON. `user_id`: the validated user the broker
    checks against the connection's login. `content_type=None` sends none; `persistent=False`
    no delivery mode (transient).
    """
    return aio_pika.Message(
        body if isinstance(body, bytes) else orjson.dumps(body),
        content_type=content_type,
        message_id=message_id,
        correlation_id=correlation_id,
        reply_to=reply_to,
        user_id=user_id,
        headers=headers,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else None,
    )
