"""`jlm submit --policy debounce --debounce-ms … --not-before …` and `jlm status` of a scheduled
job, as a user runs them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from tests.support.daemon import DaemonProcess
from tests.test_cli import jlm

from jlm.cli.requests import not_before
from jlm.config import Settings

pytestmark = pytest.mark.timeout(120)
NOW = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC).timestamp()


def test_not_before_takes_a_delay_or_a_time() -> None:
    assert not_before("+30s", NOW) == "2026-12-02T10:00:30.000Z"
    assert not_before("+1.5m", NOW) == "2026-12-02T10:01:30.000Z"
    assert not_before("+250ms", NOW) == "2026-12-02T10:00:00.250Z"
    assert not_before("2026-12-03T07:00:00+01:00", NOW) == "2026-12-03T07:00:00+01:00"
    for bad in ("30s", "+30x", "2026-12-03", "2026-12-03T07:00:00", "soon"):
        with pytest.raises(ValueError, match="--not-before"):
            not_before(bad, NOW)


def test_submit_debounce_and_not_before_then_status(settings: Settings, tmp_path: Path) -> None:
    with DaemonProcess.of(settings, tmp_path) as daemon:
        daemon.wait_ready_blocking()
        burst = [
            jlm(
                settings,
                *("submit", "demo", "--payload", f'{{"edit": {i}}}', "--json"),
                *("--policy", "debounce", "--debounce-ms", "5000", "--max-wait-ms", "20000"),
            )
            for i in range(2)
        ]
        assert all(r.returncode == 0 for r in burst), burst[0].stderr
        replies = [json.loads(r.stdout) for r in burst]
        assert replies[0]["new_job_id"] == replies[1]["new_job_id"]
        assert [r["state"] for r in replies] == ["scheduled", "scheduled"]
        later = jlm(settings, "submit", "demo", "--prefix", "p2", "--not-before", "+30s")
        assert later.returncode == 0, later.stderr
        assert "(scheduled)" in later.stdout
        assert "due        " in later.stdout
        job_id = later.stdout.split()[1]
        status = jlm(settings, "status", job_id)
        assert "state    scheduled" in status.stdout
        due = [line for line in status.stdout.splitlines() if line.startswith("due ")]
        assert len(due) == 1
        at = datetime.fromisoformat(due[0].split()[1])
        assert 20 < (at - datetime.now(UTC)).total_seconds() <= 30
        bad = jlm(settings, "submit", "demo", "--not-before", "tomorrow")
        assert bad.returncode == 2
        assert "--not-before" in bad.stderr
        assert daemon.terminate_blocking() == 0
