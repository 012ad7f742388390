"""Connecting to RabbitMQ with fail-over; a connection failure told as one line naming its cause.

Kept apart from the daemon's `jlm.broker` so that the command line's client connects without
importing the daemon's metrics and models.
"""

from __future__ import annotations

import asyncio
import errno as errnos
import logging
import socket
import ssl
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
from aio_pika.abc import AbstractConnection
from aiormq.exceptions import AMQPConnectionError, AMQPError, InvalidFrameError

from jlm.amqp.transport import CoalescingConnection, in_place
from jlm.config import Settings, redact_url
from jlm.errors import Refused, Unavailable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # seconds for one node's TCP, TLS and AMQP handshake
PROBE_TIMEOUT = 1.0  # seconds for the Redis probe of a node that never answered the handshake


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one node could not be used: a cause in words, and whether retrying can help."""

    cause: str
    refused: bool  # the node answered and said no: only a change of settings helps


def tls_context(settings: Settings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(
        cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None
    )
    if settings.tls_cert_file:
        ctx.load_cert_chain(
            str(settings.tls_cert_file),
            str(settings.tls_key_file) if settings.tls_key_file else None,
        )
    if not settings.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def connect_first(settings: Settings, name: str) -> AbstractConnection:
    """Connect to the first node of JLM_AMQP_URL that answers.

    Raises Refused when every node refused us (login, virtual host, not AMQP, TLS), Unavailable
    when at least one may yet answer (refused connection, timeout, DNS)."""
    failures: list[Failure] = []
    for url in settings.amqp_urls:
        try:
            kwargs: dict[str, Any] = {
                "timeout": CONNECT_TIMEOUT,
                "client_properties": {"connection_name": name},
            }
            if url.startswith("amqps://"):
                kwargs["ssl_context"] = tls_context(settings)
            sep = "&" if "?" in url else "?"
            full = url if "heartbeat=" in url else f"{url}{sep}heartbeat={settings.heartbeat}"
            conn: AbstractConnection = await aio_pika.connect(
                full, connection_class=CoalescingConnection, **kwargs
            )
            log.info("connected to %s", redact_url(url))
            if not in_place(conn):
                log.error(
                    "aio-pika %s / aiormq %s did not use jlm's AMQP transport: a message with "
                    "undecodable properties will close the connection, and frames are written "
                    "one by one; install the versions pyproject.toml pins",
                    version("aio-pika"),
                    version("aiormq"),
                )
            return conn
        except (AMQPError, OSError, TimeoutError) as exc:
            failures.append(await describe(url, exc))
    message = "rabbitmq: " + "; ".join(f.cause for f in failures)
    if all(f.refused for f in failures):
        raise Refused(message, "rabbitmq")
    raise Unavailable(message, "rabbitmq")


async def describe(url: str, exc: BaseException) -> Failure:
    """One connection failure in words: what went wrong at `url` and what to check."""
    parts = urlsplit(url)
    where = f"{parts.hostname or '?'}:{parts.port or (5671 if parts.scheme == 'amqps' else 5672)}"
    user = unquote(parts.username or "guest")
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    text = str(exc)
    if "ACCESS_REFUSED" in text or type(exc).__name__ == "ProbableAuthenticationError":
        return Failure(
            f"login refused (ACCESS_REFUSED) at {where} for user {user!r}: check the user and "
            "password in JLM_AMQP_URL",
            refused=True,
        )
    if isinstance(exc, InvalidFrameError) and "Connection.Close" in text:
        return Failure(
            f"virtual host {vhost!r} refused at {where}: it does not exist or user {user!r} has "
            f"no permission on it (rabbitmqctl list_permissions -p {vhost!r})",
            refused=True,
        )
    if isinstance(exc, ssl.SSLError) or "[SSL" in text:
        reason = _args_text(exc)
        if "CERTIFICATE" in reason.upper():
            # A certificate is renewed and deployed outside these settings: retried.
            return Failure(
                f"TLS handshake with {where} failed ({reason}): is JLM_TLS_CA_FILE the CA that "
                "signed the server's certificate, and is that certificate valid?",
                refused=False,
            )
        return Failure(
            f"TLS handshake with {where} failed ({reason}): is the port a TLS port (amqps:// "
            "needs one, 5671 by default)?",
            refused=True,
        )
    errno = _errno(exc)
    if isinstance(exc, socket.gaierror) or errno in (socket.EAI_NONAME, socket.EAI_AGAIN):
        return Failure(f"host {parts.hostname!r} not found (DNS)", refused=False)
    if isinstance(exc, ConnectionRefusedError) or errno == errnos.ECONNREFUSED:
        return Failure(f"connection refused at {where}: is RabbitMQ running there?", False)
    if isinstance(exc, TimeoutError):
        if parts.hostname and await _is_redis(parts.hostname, parts.port or 5672):
            return Failure(
                f"{where} is a Redis server, not RabbitMQ: JLM_AMQP_URL names the wrong port",
                refused=True,
            )
        return Failure(
            f"no AMQP handshake from {where} within {CONNECT_TIMEOUT:.0f}s: not an AMQP server, "
            "or a firewall drops the traffic",
            refused=False,
        )
    if isinstance(exc, AMQPConnectionError | OSError):
        return Failure(f"cannot connect to {where}: {_args_text(exc)}", refused=False)
    return Failure(f"{where}: {type(exc).__name__}: {redact_url(text)[:200]}", refused=False)


def _errno(exc: BaseException) -> int | None:
    """The errno of an OSError, or the one aiormq passes as its first argument."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    if exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


def _args_text(exc: BaseException) -> str:
    """The words of an exception, without aiormq's (errno, text) tuple around them."""
    words = [a for a in exc.args if isinstance(a, str)] or [str(exc)]
    return redact_url(" ".join(words))[:200]


async def _is_redis(host: str, port: int) -> bool:
    """Whether a server that never answered the AMQP handshake answers a Redis PING."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"PING\r\n")
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    return line.startswith((b"+PONG", b"-NOAUTH", b"-ERR"))


def why(exc: BaseException) -> str:
    """An exception's text for a log line or an error: URLs redacted, at most 200 characters."""
    return redact_url(str(exc))[:200]
