"""Backoff and the rate-limited warning: pure logic, no servers."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jlm.retry import Backoff, RareLog

pytestmark = pytest.mark.unit


def test_backoff_doubles_from_start_up_to_cap() -> None:
    b = Backoff(0.2, 1.0)
    assert [b.next() for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]


def test_backoff_reset_starts_over() -> None:
    b = Backoff(0.05, 30.0)
    b.next()
    b.next()
    assert b.raised
    b.reset()
    assert not b.raised
    assert b.next() == 0.05


def test_backoff_first_delay_is_start_even_above_cap() -> None:
    b = Backoff(0.2, 0.1)
    assert [b.next() for _ in range(3)] == [0.2, 0.1, 0.1]
    assert not b.raised  # the capped delay is below start: never "raised"


def test_backoff_settled_resets_only_after_a_healthy_period() -> None:
    b = Backoff(0.2, 30.0, healthy=10.0)
    b.next()
    b.next()
    assert not b.settled(9.9)
    assert b.delay == 0.8
    assert b.settled(10.0)
    assert b.delay == 0.2


def test_backoff_without_healthy_period_never_settles() -> None:
    b = Backoff(0.2, 30.0)
    b.next()
    assert not b.settled(1e9)
    assert b.delay == 0.4


def test_backoff_refuses_a_start_that_never_waits() -> None:
    with pytest.raises(ValueError, match="start > 0"):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError, match="multiplier"):
        Backoff(0.1, 1.0, multiplier=0.5)


@given(
    start=st.floats(0.001, 10.0),
    cap=st.floats(0.001, 100.0),
    multiplier=st.floats(1.0, 4.0),
    n=st.integers(1, 60),
)
def test_backoff_delays_never_shrink_and_stay_capped(
    start: float, cap: float, multiplier: float, n: int
) -> None:
    b = Backoff(start, cap, multiplier=multiplier)
    delays = [b.next() for _ in range(n)]
    assert delays[0] == start
    assert all(d <= cap for d in delays[1:])
    if start <= cap:
        assert delays == sorted(delays)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_rare_log_warns_once_per_interval_per_key(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    rare = RareLog(logging.getLogger("jlm.test_retry"), interval=5.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="jlm.test_retry"):
        assert rare.warn_rarely("redis", "waiting for %s: %s", "redis", "down")
        clock.t += 4.9
        assert not rare.warn_rarely("redis", "waiting for %s: %s", "redis", "still down")
        assert rare.warn_rarely("rabbitmq", "waiting for %s", "rabbitmq")  # another key
        clock.t += 0.1
        assert rare.warn_rarely("redis", "waiting for %s: %s", "redis", "down again")
    assert [r.getMessage() for r in caplog.records] == [
        "waiting for redis: down",
        "waiting for rabbitmq",
        "waiting for redis: down again",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
