"""systemd/jlm-worker@.service, and `jlm worker` under it: READY=1, WATCHDOG=1, STOPPING=1."""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.test_deploy_artifacts import (
    MAX_EXPOSURE,
    SYSTEMD,
    UNIT,
    require_tool,
    run,
    unit_settings,
)
from tests.test_systemd import Manager
from tests.test_worker import WorkerProcess

from jlm.config import Settings

WORKER_UNIT = SYSTEMD / "jlm-worker@.service"
EXEC_START = "ExecStart=/opt/job-lifecycle-manager/bin/jlm worker %I $JLM_WORKER_ARGS"
INSTANCE = "jlm-worker@examples.app.service"


def verifiable_copy(tmp_path: Path) -> Path:
    """The template with ExecStart pointing at a stand-in executable; nothing else changed."""
    fake = tmp_path / "bin" / "jlm"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    fake.chmod(0o755)
    text = WORKER_UNIT.read_text(encoding="utf-8")
    assert text.count(EXEC_START + "\n") == 1, f"the unit must contain `{EXEC_START}` once"
    (tmp_path / WORKER_UNIT.name).write_text(
        text.replace(EXEC_START, f"ExecStart={fake} worker %I $JLM_WORKER_ARGS"), encoding="utf-8"
    )
    return tmp_path / INSTANCE


@pytest.mark.unit
def test_the_worker_unit_verifies_clean(tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze", "systemd")
    result = run(tool, "verify", str(verifiable_copy(tmp_path)))
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, f"systemd-analyze verify failed:\n{output}"
    assert not output, f"systemd-analyze verify printed warnings:\n{output}"


@pytest.mark.unit
def test_the_worker_unit_exposure_is_low(tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze", "systemd")
    result = run(tool, "security", "--offline=yes", str(verifiable_copy(tmp_path)))
    assert result.returncode == 0, f"systemd-analyze security failed:\n{result.stderr}"
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert found, f"no overall exposure level in the output:\n{result.stdout[-2000:]}"
    exposure = float(found.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} is above {MAX_EXPOSURE}"
    print(f"\n{INSTANCE}: systemd-analyze security --offline=yes: exposure {exposure}")


@pytest.mark.unit
def test_the_worker_unit_is_hardened_as_the_daemons() -> None:
    daemon, worker = unit_settings(UNIT), unit_settings(WORKER_UNIT)
    # What differs is what makes it a worker: its command, its name, its user, its env files,
    # and the usage error (exit 2) that must not restart it in a loop.
    own = {"Description", "ExecStart", "EnvironmentFile", "User", "RestartPreventExitStatus"}
    differing = sorted(k for k in daemon.keys() | worker.keys() if daemon.get(k) != worker.get(k))
    assert set(differing) <= own, (
        f"worker and daemon units differ beyond the worker's own: {differing}"
    )
    assert worker["Type"] == ["notify"]
    assert worker["WatchdogSec"] == ["30s"]
    assert worker["RestartPreventExitStatus"] == ["2 78"]


@pytest.fixture
def manager() -> Iterator[Manager]:
    # sun_path is 108 bytes; pytest's tmp_path can exceed that.
    path = tempfile.mkdtemp(prefix="jlm-sd-", dir="/tmp" if os.path.isdir("/tmp") else None)
    m = Manager(os.path.join(path, "notify"))
    yield m
    m.close()
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(60)
async def test_jlm_worker_tells_systemd_ready_watchdog_and_stopping(
    daemon: Any, settings: Settings, manager: Manager, tmp_path: Path
) -> None:
    log = tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log"
    w = WorkerProcess(
        settings,
        "examples.app",
        log,
        job_type=None,
        NOTIFY_SOCKET=manager.notify_socket,
        WATCHDOG_USEC="400000",
    )
    try:
        await w.ready()
        got = await manager.await_for(3)
        assert got[0].startswith(b"READY=1"), got
        assert got[1:3] == [b"WATCHDOG=1", b"WATCHDOG=1"], got
        w.signal(signal.SIGTERM)
        assert await w.exited(20) == 0
        datagrams = manager.datagrams
        assert any(d.startswith(b"STOPPING=1") for d in datagrams), datagrams
    finally:
        w.close()
