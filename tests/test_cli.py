"""The command line as a newcomer uses it: `jlm run` in one terminal, `jlm submit` in another."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis
from tests.support.daemon import ROOT, DaemonProcess, env_for

from jlm.client import Client
from jlm.config import Settings
from jlm.errors import Refused


def jlm(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jlm", *args],
        env=env_for(settings, **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_walkthrough_submit_twice(settings: Settings, tmp_path: Path) -> None:
    with DaemonProcess.of(settings, tmp_path) as daemon:
        try:
            daemon.wait_ready_blocking()
            first = jlm(settings, "submit", "demo", "--payload", '{"x":1}', "--wait", "--json")
            assert first.returncode == 0, first.stderr
            second = jlm(settings, "submit", "demo", "--payload", '{"x":1}', "--wait")
            assert second.returncode == 0, second.stderr
            first_id = json.loads(first.stdout)["new_job_id"]
            assert f"previous   {first_id}" in second.stdout
            assert "stale_cancelled true" in second.stdout
            status = jlm(settings, "status", first_id)
            assert "state    cancelled" in status.stdout
            missing = jlm(settings, "status", "0000000000-" + "0" * 32)
            assert missing.returncode == 1
            assert "not_found" in missing.stderr
            events = jlm(settings, "events", "--json")
            types = [json.loads(line)["type"] for line in events.stdout.splitlines()]
            assert types == ["job.enqueued", "job.superseded", "job.enqueued"]
            assert daemon.terminate_blocking() == 0
        finally:
            daemon.kill()


def test_usage_and_unreachable_exit_codes(settings: Settings) -> None:
    assert jlm(settings, "submit").returncode == 2
    down = jlm(settings, "status", "x", JLM_AMQP_URL="amqp://guest:guest@127.0.0.1:1/")
    assert down.returncode == 69
    assert "unavailable" in down.stderr


def test_configuration_errors_exit_78_and_name_the_setting(
    settings: Settings, tmp_path: Path
) -> None:
    bad = jlm(settings, "check-config", JLM_PREFETCH="lots")
    assert bad.returncode == 78
    assert "JLM_PREFETCH" in bad.stderr
    toml = tmp_path / "jlm.toml"
    toml.write_text('[job_types."a"]\npolicy = "newest"\n')
    bad = jlm(settings, "run", JLM_CONFIG=str(toml))
    assert bad.returncode == 78
    assert "job_types.a.policy" in bad.stderr
    missing = jlm(settings, "check-config", JLM_AMQP_URL_FILE=str(tmp_path / "nope"))
    assert missing.returncode == 78
    assert "JLM_AMQP_URL_FILE" in missing.stderr
    secret = tmp_path / "amqp"
    secret.write_text("  amqp://guest:s3cret@127.0.0.1:5672/\n")
    ok = jlm(settings, "check-config", JLM_AMQP_URL_FILE=str(secret))
    assert ok.returncode == 0
    assert "amqp://guest:***@127.0.0.1:5672/" in ok.stdout
    assert "s3cret" not in ok.stdout + ok.stderr


async def test_sigterm_drains_in_flight_requests_without_loss(
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """SIGTERM with 2,000 requests queued: exit 0; after a restart each has one decision."""
    settings = make_settings()
    first = DaemonProcess.of(settings, tmp_path, name="first")
    await first.wait_ready()
    async with Client(settings) as client:
        futures = [
            await client.send(
                "manage",
                {"job_type": "drain", "cache_prefix": f"p{i % 50}", "payload": {"i": i}},
                message_id=f"d{i}",
            )
            for i in range(2000)
        ]
        await asyncio.sleep(0.3)  # let it get busy
        code = await first.terminate()
        assert code == 0
        answered_before = sum(f.done() for f in futures)
        second = DaemonProcess.of(settings, tmp_path, name="second")
        try:
            await second.wait_ready()
            replies = await asyncio.wait_for(asyncio.gather(*futures), 120)
        finally:
            await second.terminate()
    assert all(r["success"] for r in replies)
    job_ids = [r["new_job_id"] for r in replies]
    assert len(set(job_ids)) == 2000, "a request was decided twice or lost"
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        jobs = [k async for k in client.scan_iter(match=f"{settings.redis_namespace}:{{*}}:job:*")]
        records = [k async for k in client.scan_iter(match=f"{settings.redis_namespace}:*:req:d*")]
        if jobs or records:
            await client.delete(*jobs, *records)
    finally:
        await client.aclose()
    # One job hash per decision (its history list beside it): no request decided twice.
    assert len([k for k in jobs if not k.endswith(b":h")]) == 2000
    assert len(records) == 2000
    print(
        f"answered before SIGTERM finished: {answered_before}, after restart: "
        f"{2000 - answered_before}"
    )


def test_a_defect_ends_the_daemon_with_one_record_and_exit_70(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception no part of the daemon handles is a defect: its traceback is one critical
    record (the journal keeps it whole) and the exit code is 70, which the unit restarts; a
    configuration refusal stays 78."""
    from jlm import cli
    from jlm.service import Service

    async def broken(self: Service, *, handle_signals: bool = True) -> None:
        raise RuntimeError("a defect")

    monkeypatch.setattr(Service, "run", broken)
    with caplog.at_level(logging.INFO, logger="jlm.service"):
        assert cli._run(settings, argparse.Namespace()) == 70
    [record] = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert record.getMessage() == "stopped by an unexpected error: RuntimeError: a defect"
    assert record.exc_info is not None
    assert record.exc_info[0] is RuntimeError

    async def stray_cancel(self: Service, *, handle_signals: bool = True) -> None:
        raise asyncio.CancelledError  # as aiormq fails the calls of a connection it closes

    monkeypatch.setattr(Service, "run", stray_cancel)
    assert cli._run(settings, argparse.Namespace()) == 70

    async def refused(self: Service, *, handle_signals: bool = True) -> None:
        async with anyio.create_task_group():
            raise Refused("login refused at 127.0.0.1:5672 for user 'u'", "rabbitmq")

    monkeypatch.setattr(Service, "run", refused)
    assert cli._run(settings, argparse.Namespace()) == 78
