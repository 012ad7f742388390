"""A job's states and the moves between them: the rule the Lua scripts keep.

    (new) ─► scheduled ─► pending ─► running ─► succeeded | failed
                 │  ▲         │         │  └──► pending (a retry, or a lost worker's job)
                 │  └─┘       │         └──► cancelled (cooperative)
                 └──────────► cancelled ◄┘

`scheduled` → `scheduled` is a debounce that restarted the window; `running` → `running` a note
(superseded while it runs). A job may also start `pending`. Terminal states never change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

JobState = Literal["scheduled", "pending", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
LIVE: frozenset[str] = frozenset({"scheduled", "pending", "running"})

TRANSITIONS: Mapping[str | None, frozenset[str]] = {
    None: frozenset({"scheduled", "pending"}),
    "scheduled": frozenset({"scheduled", "pending", "cancelled"}),
    "pending": frozenset({"running", "cancelled"}),
    "running": frozenset({"running", "pending", "succeeded", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


def allowed(before: str | None, after: str) -> bool:
    """Whether a job may go from `before` (None: it did not exist) to `after`."""
    return after in TRANSITIONS.get(before, frozenset())
