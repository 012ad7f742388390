"""Waiting out a passing fault: one back-off for every retry loop, one rate-limited warning."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

WARN_INTERVAL = 5.0  # seconds between two warnings under one key
# The first waits of the loops (each grows up to the settings' retry_max_delay).
RECONNECT_START = 0.2  # a connection or session to open again
STEP_RETRY_START = 0.05  # one step of a request or job (a script call, a publish)


class Backoff:
    """Delays that grow by `multiplier` from `start` up to `cap`, and start over when reset.

    The first delay is `start` even above `cap` (a cap configured below a loop's start delay
    only caps the delays that follow). `healthy` is the time after which a success counts as
    settled: `settled(lasted)` resets the delays then, and keeps them growing otherwise."""

    def __init__(
        self,
        start: float,
        cap: float,
        *,
        multiplier: float = 2.0,
        healthy: float | None = None,
    ) -> None:
        if start <= 0 or multiplier < 1:
            raise ValueError("a back-off needs start > 0 and multiplier >= 1")
        self.start = start
        self.cap = cap
        self.multiplier = multiplier
        self.healthy = healthy
        self._delay = start

    @property
    def delay(self) -> float:
        """The delay the next failure waits."""
        return self._delay

    @property
    def raised(self) -> bool:
        """Whether failures since the last reset have raised the delay above `start`."""
        return self._delay > self.start

    def next(self) -> float:
        """The delay to wait now, after a failure; the one after it grows (up to `cap`)."""
        delay = self._delay
        self._delay = min(delay * self.multiplier, self.cap)
        return delay

    def reset(self) -> None:
        """A success: the next failure waits `start` again."""
        self._delay = self.start

    def settled(self, lasted: float) -> bool:
        """Whether a success that lasted `lasted` seconds was healthy (and the delays reset)."""
        if self.healthy is not None and lasted >= self.healthy:
            self.reset()
            return True
        return False


class RareLog:
    """Warnings at most once per `interval` seconds per key: a fault that lasts is one line every
    few seconds, not one per retry."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = WARN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}

    def warn_rarely(self, key: str, msg: str, *args: Any) -> bool:
        """Log a warning unless one under `key` was logged within the interval; True if logged."""
        now = self._clock()
        if now - self._last.get(key, 0.0) < self._interval:
            return False
        self._last[key] = now
        self._log.warning(msg, *args)
        return True
