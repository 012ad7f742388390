"""Logging: JSON lines when not on a terminal, readable lines on one; secrets never printed.

Under systemd with stderr connected to the journal (`$JOURNAL_STREAM` names stderr's device and
inode), each line starts with its syslog priority, `<3>` error, `<4>` warning, `<6>` info,
`<7>` debug (sd-daemon(3)), which journald strips and stores, so `journalctl -p err` works.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

import orjson

from jlm.config import redact_url
from jlm.tracing import TraceFilter

_FIELDS = (
    "request_id",
    "job_id",
    "trace_id",
    "scope",
    "decision",
    "op",
    "worker",
    "job_type",
    "attempt",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact_url(record.getMessage()),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = redact_url(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = redact_url(super().format(record))
        extras = [f"{n}={getattr(record, n)}" for n in _FIELDS if getattr(record, n, None)]
        return f"{line} [{' '.join(extras)}]" if extras else line


def priority(levelno: int) -> int:
    """The syslog priority of a logging level: 2 critical, 3 error, 4 warning, 6 info, 7 debug."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    return 6 if levelno >= logging.INFO else 7


class JournalFormatter(logging.Formatter):
    """Another formatter's lines, each prefixed with the record's `<priority>`."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def to_journal(stream: IO[str], environ: Mapping[str, str] = os.environ) -> bool:
    """True when `stream` is the journal stream systemd names in $JOURNAL_STREAM (DEV:INODE);
    a child whose stderr was redirected elsewhere inherits the variable but not the stream."""
    dev, sep, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (sep and dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no file descriptor (a test's StringIO), or closed
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup(level: str = "INFO", fmt: str = "auto", *, library_logs: bool = True) -> None:
    """Log to stderr at `level`; without `library_logs`, the AMQP clients' own records are
    dropped (the caller reports connection failures in its own words)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    formatter: logging.Formatter = JsonFormatter() if use_json else TextFormatter()
    if to_journal(sys.stderr):
        formatter = JournalFormatter(formatter)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(TraceFilter())  # the trace id of the request or job being handled
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The AMQP clients are chatty about reconnects we already report in our own words.
    for noisy in ("aiormq", "aio_pika"):
        quiet = max(logging.getLevelName(level), logging.WARNING)
        logging.getLogger(noisy).setLevel(quiet if library_logs else logging.CRITICAL + 1)


def fatal(message: str) -> None:
    """A one-line error before logging is set up (a configuration error), redacted, at
    priority error when stderr is the journal."""
    line = " ".join(redact_url(message).split())
    print(f"<3>{line}" if to_journal(sys.stderr) else line, file=sys.stderr)
