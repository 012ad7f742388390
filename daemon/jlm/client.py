"""Clients of the request exchange.

`JobsClient` is the publisher's client: a broker URL is all it needs, replies come over RabbitMQ
Direct Reply-to (no queue per client), every request has a `message_id`, replies are pydantic
models and errors typed exceptions (`jlm.client_errors`); `jobs.job(id)` is a handle on one job.
`Client`, the raw one (untyped dicts, any body, a reply queue of its own), is what tests use;
the command line's requests go through `JobsClient`. Importing this module imports no Redis client.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Generator
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from aiormq.exceptions import AMQPError, ChannelAccessRefused, ChannelNotFoundEntity, PublishError
from pamqp.commands import Basic
from pydantic import BaseModel

from jlm import otel, tracing
from jlm.amqp.connect import connect_first, why
from jlm.amqp.names import JSON, REQUESTS
from jlm.client_errors import (
    BrokerUnavailable,
    JobsError,
    ReplyTimeout,
    error_of,
)
from jlm.config import Settings
from jlm.errors import Refused, Unavailable
from jlm.job_handle import Job
from jlm.messages import CachedResult, CancelReply, Decision, InvalidateReply, JobStatus

__all__ = [
    "CachedResult",
    "CancelReply",
    "Client",
    "Decision",
    "InvalidateReply",
    "Job",
    "JobStatus",
    "JobsClient",
    "JobsError",
]

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
M = TypeVar("M", bound=BaseModel)


async def request_consumers(conn: AbstractConnection) -> int | None:
    """How many consumers `jlm.requests` has (0: no daemon is running); None when it does not
    exist (no daemon ever ran on this virtual host). A passive declare on a channel of its own."""
    channel = await conn.channel()
    try:
        queue = await channel.declare_queue(REQUESTS, passive=True)
        return queue.declaration_result.consumer_count or 0
    except ChannelNotFoundEntity:
        return None
    finally:
        if not channel.is_closed:
            await channel.close()


class Client:
    """Publishes requests to `jlm.requests` and waits for the daemon's replies."""

    def __init__(self, settings: Settings, *, user_id: str | None = None) -> None:
        """`user_id`, when given, is set on every request (the broker checks it is ours)."""
        self._settings = settings
        self._conn: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._replies: AbstractQueue | None = None
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._user = user_id

    async def __aenter__(self) -> Client:
        self._conn = await connect_first(self._settings, "jlm client")
        self._channel = await self._conn.channel(publisher_confirms=True)
        self._replies = await self._channel.declare_queue("", exclusive=True, auto_delete=True)
        await self._replies.consume(self._on_reply, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        fut = self._waiting.pop(message.correlation_id or "", None)
        if fut is not None and not fut.done():
            fut.set_result(orjson.loads(message.body))

    async def consumers(self) -> int | None:
        """How many consumers `jlm.requests` has (a passive declare); None when it does not
        exist, i.e. no daemon ever ran on this virtual host."""
        assert self._conn is not None
        return await request_consumers(self._conn)

    async def send(
        self,
        op: str,
        body: dict[str, Any] | bytes,
        *,
        message_id: str | None = None,
        wait: bool = True,
        user_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> asyncio.Future[dict[str, Any]] | None:
        """Publish one request (confirmed); return a future of its reply when `wait`."""
        assert self._channel is not None
        assert self._replies is not None
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        correlation_id = uuid.uuid4().hex
        fut: asyncio.Future[dict[str, Any]] | None = None
        if wait:
            fut = asyncio.get_running_loop().create_future()
            self._waiting[correlation_id] = fut
        exchange = await self._channel.get_exchange(REQUESTS, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                raw,
                content_type="application/json",
                message_id=message_id or uuid.uuid4().hex,
                correlation_id=correlation_id,
                reply_to=self._replies.name if wait else None,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                user_id=user_id or self._user,
                headers=headers,
            ),
            routing_key=op,
        )
        return fut

    async def call(
        self,
        op: str,
        body: dict[str, Any] | bytes,
        *,
        timeout: float = 30.0,
        **kwargs: Any,
    ) -> dict[str, Any]:
        fut = await self.send(op, body, wait=True, **kwargs)
        assert fut is not None
        return await asyncio.wait_for(fut, timeout)


def url_user(settings: Settings) -> str | None:
    """The user name in the first broker URL: what RabbitMQ will accept as `user_id`."""
    user = urlsplit(settings.amqp_urls[0]).username
    return unquote(user) if user else None


def url_vhost(settings: Settings) -> str:
    """The virtual host of the first broker URL."""
    path = urlsplit(settings.amqp_urls[0]).path
    return unquote(path[1:]) if len(path) > 1 else "/"


class JobsClient:
    """The publisher's client. `async with JobsClient.connect(url) as jobs:` (or
    `jobs = await JobsClient.connect(url)` and later `await jobs.aclose()`).

    One connection and one channel; replies over Direct Reply-to. `timeout` bounds the wait for
    each reply. With `user_id`, every request carries it (the broker checks it is the URL's user).
    """

    def __init__(
        self,
        url: str,
        *,
        user_id: str | None = None,
        timeout: float = 30.0,
        name: str = "jlm",
        settings: Settings | None = None,
    ) -> None:
        """`settings` (optional) gives the TLS files and the heartbeat; `url` replaces its
        `amqp_url`."""
        base = settings if settings is not None else Settings()
        self._settings = base.model_copy(update={"amqp_url": url})
        self._user = user_id
        self.timeout = timeout
        self._name = name
        self._conn: AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._lock = asyncio.Lock()

    @classmethod
    def connect(cls, url: str, **kwargs: Any) -> JobsClient:
        """A client of the broker at `url` (comma-separated nodes fail over); connected when
        entered (`async with`) or awaited."""
        return cls(url, **kwargs)

    def __await__(self) -> Generator[Any, None, Self]:
        return self._open().__await__()

    async def __aenter__(self) -> Self:
        return await self._open()

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _open(self) -> Self:
        await self._ready()
        return self

    async def aclose(self) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(BrokerUnavailable("the client was closed"))
        self._waiting.clear()
        if self._conn is not None and not self._conn.is_closed:
            with contextlib.suppress(AMQPError, OSError, RuntimeError):
                await self._conn.close()
        self._conn = self._channel = None

    async def _ready(self) -> aiormq.abc.AbstractChannel:
        """The channel, (re)opened if the connection or the channel is gone."""
        async with self._lock:
            if self._channel is not None and not self._channel.is_closed:
                return self._channel
            try:
                if self._conn is None or self._conn.is_closed:
                    self._conn = await connect_first(self._settings, f"{self._name} client")
                channel = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
                # A closed channel loses the replies of its requests: their callers learn it now.
                channel.close_callbacks.add(self._fail_waiting)
                raw: aiormq.abc.AbstractChannel = await channel.get_underlay_channel()
                await raw.basic_consume(DIRECT_REPLY_TO, self._on_reply, no_ack=True)
            except (Refused, Unavailable) as exc:
                raise BrokerUnavailable(exc.message, refused=isinstance(exc, Refused)) from exc
            except (AMQPError, OSError, RuntimeError) as exc:
                raise BrokerUnavailable(f"rabbitmq: {why(exc)}") from exc
            self._channel = raw
            return raw

    def _fail_waiting(self, _channel: object, exc: BaseException | None = None) -> None:
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(BrokerUnavailable(f"rabbitmq: channel closed: {exc}"))

    async def _on_reply(self, message: aiormq.abc.DeliveredMessage) -> None:
        fut = self._waiting.pop(message.header.properties.correlation_id or "", None)
        if fut is not None and not fut.done():
            try:
                fut.set_result(orjson.loads(message.body))
            except orjson.JSONDecodeError as exc:
                fut.set_exception(JobsError(f"the reply is not JSON: {exc}"))

    async def request(
        self,
        op: str,
        body: dict[str, Any],
        *,
        message_id: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """One request and its reply as a dict (`success: false` raised as `RequestFailed`).

        The request carries `message_id` (a new one unless given: a retry with the same id and
        body is answered the same, and changes nothing twice) and the current trace context
        (the current OpenTelemetry span's, else `jlm.tracing.current()`), if any.
        """
        channel = await self._ready()
        correlation_id = uuid.uuid4().hex
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = fut
        props = Basic.Properties(
            content_type=JSON,
            delivery_mode=2,
            message_id=message_id or uuid.uuid4().hex,
            correlation_id=correlation_id,
            reply_to=DIRECT_REPLY_TO,
            user_id=self._user,
            headers=self._trace_headers(),
        )
        try:
            await _publish(channel, op, orjson.dumps(body), props)
            wait = self.timeout if timeout is None else timeout
            try:
                reply = await asyncio.wait_for(asyncio.shield(fut), wait)
            except TimeoutError as exc:
                raise ReplyTimeout(
                    f"no reply to {op} within {wait:g}s: is a daemon running?"
                ) from exc
        finally:
            self._waiting.pop(correlation_id, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: a failure here was already raised another way
        if reply.get("success") is not True:
            raise error_of(reply)
        return reply

    async def send(self, op: str, body: dict[str, Any], *, message_id: str | None = None) -> str:
        """Publish a request (confirmed by the broker) without waiting for a reply: the daemon
        answers no one. Its `message_id`, to find its outcome in the events."""
        channel = await self._ready()
        message_id = message_id or uuid.uuid4().hex
        props = Basic.Properties(
            content_type=JSON,
            delivery_mode=2,
            message_id=message_id,
            user_id=self._user,
            headers=self._trace_headers(),
        )
        await _publish(channel, op, orjson.dumps(body), props)
        return message_id

    async def consumers(self) -> int | None:
        """How many consumers `jlm.requests` has (0: no daemon is running); None when it does
        not exist (no daemon ever ran on this virtual host)."""
        await self._ready()
        assert self._conn is not None
        return await request_consumers(self._conn)

    @staticmethod
    def _trace_headers() -> dict[str, Any]:
        trace = otel.current() or tracing.current()
        return dict(trace.headers()) if trace is not None else {}

    async def _typed(self, model: type[M], op: str, body: dict[str, Any], **kw: Any) -> M:
        return model.model_validate(await self.request(op, body, **kw))

    async def manage(
        self,
        job_type: str,
        payload: dict[str, Any],
        *,
        prefix: str = "job",
        priority: int = 5,
        policy: str | None = None,
        cancel_running: bool = False,
        requested_at: datetime | str | None = None,
        message_id: str | None = None,
    ) -> Decision:
        """Ask for a job of the scope (`job_type`, `prefix`): the daemon's `Decision`."""
        body: dict[str, Any] = {
            "job_type": job_type,
            "payload": payload,
            "cache_prefix": prefix,
            "priority": priority,
            "cancel_running": cancel_running,
        }
        if policy is not None:
            body["policy"] = policy
        if isinstance(requested_at, datetime):
            body["requested_at"] = requested_at.astimezone(UTC).isoformat()
        elif requested_at is not None:
            body["requested_at"] = requested_at
        return await self._typed(Decision, "manage", body, message_id=message_id)

    async def status(self, job_id: str) -> JobStatus:
        return await self._typed(JobStatus, "status", {"job_id": job_id})

    async def cancel(
        self, job_id: str, *, running: bool = False, message_id: str | None = None
    ) -> CancelReply:
        body = {"job_id": job_id, "running": running}
        return await self._typed(CancelReply, "cancel", body, message_id=message_id)

    async def invalidate(
        self, job_type: str, *, prefix: str = "job", message_id: str | None = None
    ) -> InvalidateReply:
        body = {"job_type": job_type, "cache_prefix": prefix}
        return await self._typed(InvalidateReply, "invalidate", body, message_id=message_id)

    async def cached(self, job_type: str, *, prefix: str = "job") -> CachedResult:
        """The scope's cached result (the `result` operation)."""
        body = {"job_type": job_type, "cache_prefix": prefix}
        return await self._typed(CachedResult, "result", body)

    def job(self, job_id: str) -> Job:
        """A handle on one job."""
        return Job(self, job_id)


async def _publish(
    channel: aiormq.abc.AbstractChannel, op: str, body: bytes, props: Basic.Properties
) -> None:
    """Publish a request to jlm.requests, mandatory and confirmed; BrokerUnavailable if not."""
    try:
        confirm = await channel.basic_publish(
            body, exchange=REQUESTS, routing_key=op, properties=props, mandatory=True
        )
    except PublishError as exc:
        raise BrokerUnavailable(
            f"{REQUESTS} routes nothing for {op!r}: no daemon ever declared its queue on this "
            "virtual host"
        ) from exc
    except ChannelAccessRefused as exc:
        raise BrokerUnavailable(
            f"rabbitmq: {why(exc)} (check the user's permissions on this virtual host)",
            refused=True,
        ) from exc
    except (AMQPError, OSError, RuntimeError) as exc:
        raise BrokerUnavailable(f"rabbitmq: publishing to {REQUESTS}: {why(exc)}") from exc
    if not isinstance(confirm, Basic.Ack):
        raise BrokerUnavailable(f"rabbitmq refused the request to {REQUESTS}")
