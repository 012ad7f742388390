"""The cluster tests' accounting lines, printed again in pytest's terminal summary.

A module of its own, not the conftest: pytest imports a conftest under its own name, so a list
defined there and imported by the tests would be two lists.
"""

from __future__ import annotations

LINES: list[str] = []
