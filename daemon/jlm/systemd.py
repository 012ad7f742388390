"""The sd_notify protocol (readiness, status, watchdog) spoken directly, without libsystemd.

systemd hands a `Type=notify` service the address of a datagram socket in `NOTIFY_SOCKET`; each
datagram is a few `KEY=VALUE` lines. The protocol is small and stable (see `sd_notify(3)`), so
speaking it here avoids a C dependency and keeps the daemon importable where systemd is absent:
without `NOTIFY_SOCKET` every call is a cheap no-op.

Choices worth knowing (the contract is silent on them):

- Only filesystem paths (`/run/...`) and abstract names (`@...`) are understood; `vsock:` and
  relative addresses disable the notifier, logged at debug, instead of failing the start.
- The socket is non-blocking and every send error is logged at debug and swallowed: a full queue or
  a vanished manager must never stall or kill the daemon. Such a datagram is simply lost, exactly as
  with `sd_notify(3)`, which also ignores the manager being gone.
- The environment is left untouched (no `unset_environment`), so it can be read again; the daemon
  spawns no children that could mistake themselves for the main process.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Self

import anyio

log = logging.getLogger(__name__)

_USEC_PER_SECOND = 1_000_000
# systemd's USEC_INFINITY; it rejects it as a watchdog timeout, so do we.
_USEC_INFINITY = 2**64 - 1
# A STATUS line is shown in `systemctl status`; a newline would end it and could forge another
# assignment (e.g. "STATUS=x\nREADY=1"), so line breaks and NULs become spaces.
_STATUS_UNSAFE = str.maketrans(dict.fromkeys("\r\n\0\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029", " "))


def sanitize_status(text: str) -> str:
    """Return `text` as a single line, safe as the value of a `STATUS=` assignment."""
    return text.translate(_STATUS_UNSAFE)


def _socket_address(notify_socket: str) -> bytes | None:
    """Translate a `NOTIFY_SOCKET` value to a `sendto` address, or None when unsupported."""
    if notify_socket.startswith("/"):
        return os.fsencode(notify_socket)
    if notify_socket.startswith("@") and len(notify_socket) > 1:
        # Linux abstract namespace: the name is the bytes after a leading NUL.
        return b"\0" + os.fsencode(notify_socket[1:])
    return None


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """The watchdog timeout meant for this process, following `sd_watchdog_enabled(3)`."""
    raw_usec = environ.get("WATCHDOG_USEC")
    if raw_usec is None:
        return None
    try:
        usec = int(raw_usec.strip(), 10)
    except ValueError:
        log.debug("ignoring malformed WATCHDOG_USEC=%r", raw_usec)
        return None
    if not 0 < usec < _USEC_INFINITY:
        log.debug("ignoring out-of-range WATCHDOG_USEC=%r", raw_usec)
        return None
    raw_pid = environ.get("WATCHDOG_PID")
    if raw_pid is not None:
        # A watchdog set up for a parent (a wrapper script, a forking supervisor) is not ours:
        # pinging on its behalf would hide that the process systemd watches is stuck.
        try:
            pid = int(raw_pid.strip(), 10)
        except ValueError:
            log.debug("ignoring watchdog, malformed WATCHDOG_PID=%r", raw_pid)
            return None
        if pid != os.getpid():
            log.debug("watchdog is for pid %d, not this process (%d)", pid, os.getpid())
            return None
    return usec


class Notifier:
    """Sends sd_notify datagrams to systemd; every method is a no-op when not run under it.

    Methods return True when the datagram was handed to the kernel, False when disabled or when
    sending failed (logged at debug, never raised).
    """

    def __init__(self, notify_socket: str | None = None, watchdog_usec: int | None = None) -> None:
        """Address the manager at `notify_socket` (a `NOTIFY_SOCKET` value); None disables."""
        self._address = _socket_address(notify_socket) if notify_socket else None
        if notify_socket and self._address is None:
            log.debug("unsupported NOTIFY_SOCKET=%r, notifications disabled", notify_socket)
        self._notify_socket = notify_socket if self._address is not None else None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Build from `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (default: os.environ)."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None, _watchdog_usec(env))

    def __repr__(self) -> str:
        return f"Notifier({self._notify_socket!r}, watchdog_usec={self._watchdog_usec})"

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens for notifications."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half the timeout, as systemd advises), or None."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / _USEC_PER_SECOND / 2

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete, with an optional status in the same datagram."""
        return self._send("READY=1", status)

    def status(self, text: str) -> bool:
        """Set the free-form status line shown by `systemctl status`."""
        return self._send(None, text)

    def watchdog(self) -> bool:
        """Ping the watchdog: this process is alive and healthy."""
        return self._send("WATCHDOG=1", None)

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd shutdown has begun, with an optional status in the same datagram."""
        return self._send("STOPPING=1", status)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before the current start/stop timeout fires.

        Raises ValueError when `seconds` is negative or not finite: that is a caller bug.
        """
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"extend_timeout needs a finite, non-negative duration: {seconds!r}")
        return self._send(f"EXTEND_TIMEOUT_USEC={round(seconds * _USEC_PER_SECOND)}", None)

    def close(self) -> None:
        """Release the socket; a later notification opens a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _send(self, assignment: str | None, status: str | None) -> bool:
        if self._address is None:
            return False
        lines = [assignment] if assignment is not None else []
        if status is not None:
            lines.append(f"STATUS={sanitize_status(status)}")
        # "replace" because a lone surrogate (e.g. from a decoded file name) must not raise here.
        payload = "\n".join(lines).encode("utf-8", errors="replace")
        try:
            if self._sock is None:
                # One socket for the life of the notifier (not inherited by children, PEP 446),
                # non-blocking so that a manager which stopped reading never stalls the event loop.
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            log.debug("sd_notify %r to %r failed: %s", payload, self._notify_socket, exc)
            return False
        return True


async def watchdog_loop(
    notifier: Notifier,
    healthy: Callable[[], bool],
    interval: float | None = None,
) -> None:
    """Ping the watchdog every `interval` seconds while `healthy()` is true, until cancelled.

    `interval` defaults to `notifier.watchdog_interval`; when there is none (no watchdog, or not
    under systemd) this returns at once. Running on the event loop is the point: a blocked loop
    stops the pings by itself, and `healthy` lets the daemon stop them when a dependency has been
    lost for too long, so systemd restarts a daemon that can no longer do its work.
    """
    if interval is None:
        interval = notifier.watchdog_interval
    if interval is None or not notifier.enabled:
        return
    if not math.isfinite(interval) or interval <= 0:
        raise ValueError(f"watchdog interval must be a positive number of seconds: {interval!r}")
    while True:
        try:
            ok = healthy()
        except Exception:
            # Health that cannot be determined is not health; keep looping so that a transient
            # failure of the check does not silence the watchdog for good.
            log.exception("watchdog health check failed; withholding the ping")
            ok = False
        if ok:
            notifier.watchdog()
        # Ping first, then sleep: the first ping must come within the timeout of the start.
        await anyio.sleep(interval)
