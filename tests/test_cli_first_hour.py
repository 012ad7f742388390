"""The command line's failures, as a newcomer meets them: one line naming the cause, the right
exit code, the next command to try, no traceback and no library log line; nothing published when
no daemon listens."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest
from tests.security_helpers import (
    PUBLISHER_GRANTS,
    add_shared_users,
    delete_shared_users,
    new_user,
)
from tests.support.daemon import ROOT, DaemonProcess, env_for
from tests.support.ports import free_port
from tests.support.services import AMQP_BASE, start_daemon
from tests.support.tools import require_tool

from jlm.amqp.names import REQUESTS
from jlm.cli.output import describe
from jlm.cli.parser import build_parser
from jlm.completion import script
from jlm.config import Settings, unknown_variable
from jlm.events import Filter, parse_since


def jlm(
    settings: Settings, *args: str, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jlm", *args],
        env=env_for(settings, **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_clean_line(out: subprocess.CompletedProcess[str]) -> str:
    """The single line on stderr: no traceback, no library (JSON) log record beside it."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1, out.stderr
    assert not lines[0].startswith("{"), out.stderr
    return lines[0]


@dataclass(frozen=True)
class Mistake:
    name: str
    url: str
    code: int
    words: str


def _mistakes() -> list[Mistake]:
    base = AMQP_BASE.removeprefix("amqp://")
    host = base.split("@", 1)[1]
    return [
        Mistake(
            "unknown vhost",
            f"amqp://{base}/jlm-no-such-vhost-{uuid.uuid4().hex[:8]}",
            78,
            "virtual host 'jlm-no-such-vhost-",
        ),
        Mistake("wrong password", f"amqp://guest:s3cr3tpw@{host}/", 78, "login refused"),
        Mistake("the Redis port", "amqp://guest:guest@127.0.0.1:6379/", 78, "is a Redis server"),
        Mistake("TLS on a plain port", f"amqps://{base}/", 78, "TLS handshake"),
        Mistake(
            "unknown host", "amqp://guest:guest@no-such-host.invalid:5672/", 69, "not found (DNS)"
        ),
        Mistake(
            "nothing listening",
            f"amqp://guest:guest@127.0.0.1:{free_port()}/",
            69,
            "connection refused",
        ),
    ]


@pytest.mark.parametrize("mistake", _mistakes(), ids=lambda m: m.name)
def test_connection_mistakes_are_one_line_naming_the_cause(
    settings: Settings, mistake: Mistake
) -> None:
    out = jlm(settings, "status", "x", JLM_AMQP_URL=mistake.url)
    assert out.returncode == mistake.code, out.stderr
    line = one_clean_line(out)
    assert mistake.words in line, line
    assert "s3cr3tpw" not in line  # the password is never shown
    as_json = jlm(settings, "submit", "demo", "--json", JLM_AMQP_URL=mistake.url)
    assert as_json.returncode == mistake.code
    assert "Traceback" not in as_json.stderr
    error = json.loads(as_json.stdout)
    assert error["success"] is False
    assert mistake.words in error["error"]["message"]


def test_verbose_shows_the_library_log(settings: Settings) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    out = jlm(settings, "status", "x", "--verbose", JLM_AMQP_URL=url)
    assert out.returncode == 69
    assert "aiormq" in out.stderr or "aio_pika" in out.stderr


@pytest.mark.parametrize(
    ("args", "env", "code", "words"),
    [
        (("submit", "demo", "--payload", "[1]"), {}, 2, "--payload must be a JSON object"),
        (("submit", "demo", "--payload", "{x"), {}, 2, "--payload is not JSON"),
        (("events", "--since", "yesterday"), {}, 2, "--since 'yesterday'"),
        (("status", "x"), {"JLM_PREFETCH": "lots"}, 78, "JLM_PREFETCH"),
        (("submit",), {}, 2, "the following arguments are required"),
    ],
)
def test_usage_and_configuration_errors(
    settings: Settings, args: tuple[str, ...], env: dict[str, str], code: int, words: str
) -> None:
    text = jlm(settings, *args, **env)
    assert text.returncode == code
    assert words in text.stderr
    assert "Traceback" not in text.stderr
    as_json = jlm(settings, *args, "--json", **env)
    assert as_json.returncode == code
    error = json.loads(as_json.stdout)
    assert error["success"] is False
    assert words in error["error"]["message"]


def test_a_misspelt_variable_is_named_with_the_closest_setting(settings: Settings) -> None:
    out = jlm(settings, "check-config", JLM_PREFTCH="5")
    assert out.returncode == 0
    assert "JLM_PREFTCH is not a setting: ignored (did you mean JLM_PREFETCH?)" in out.stderr
    shown = json.loads(jlm(settings, "check-config", "--json", JLM_PREFTCH="5").stdout)
    assert shown["warnings"] == [
        "JLM_PREFTCH is not a setting: ignored (did you mean JLM_PREFETCH?)"
    ]


async def _queued(settings: Settings) -> int:
    conn = await aio_pika.connect(settings.amqp_url)
    async with conn:
        channel = await conn.channel()
        queue = await channel.declare_queue(REQUESTS, passive=True)
        return queue.declaration_result.message_count or 0


async def test_no_daemon_answers_at_once_and_publishes_nothing(settings: Settings) -> None:
    never_ran = await asyncio.to_thread(jlm, settings, "submit", "demo")
    assert never_ran.returncode == 69
    assert "no daemon has run here" in one_clean_line(never_ran)
    # The daemon ran once (the topology exists) and is gone: no consumer.
    await (await start_daemon(settings)).stop()
    out = await asyncio.to_thread(jlm, settings, "submit", "demo", "--timeout", "30")
    assert out.returncode == 69
    line = one_clean_line(out)
    assert "no daemon consumes jlm.requests" in line
    assert "--queue-anyway" in line
    assert "nothing was sent" in line
    status = await asyncio.to_thread(jlm, settings, "status", "x", "--json")
    assert status.returncode == 69
    assert json.loads(status.stdout)["error"]["code"] == "no_daemon"
    assert await _queued(settings) == 0
    # Asked to queue anyway: published, and a timeout says it stays queued, not that it failed.
    anyway = await asyncio.to_thread(
        jlm, settings, "submit", "demo", "--queue-anyway", "--timeout", "1"
    )
    assert anyway.returncode == 69
    assert "still queued" in one_clean_line(anyway)
    assert await _queued(settings) == 1
    fired = await asyncio.to_thread(jlm, settings, "submit", "demo", "--queue-anyway", "--no-wait")
    assert fired.returncode == 0
    assert await _queued(settings) == 2


def _events_of(out: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_with_a_daemon_failures_are_never_success(settings: Settings, tmp_path: Path) -> None:
    with DaemonProcess.of(settings, tmp_path) as daemon:
        try:
            daemon.wait_ready_blocking()
            # Waiting is the default: a rejected request fails with the daemon's reason.
            bad = jlm(settings, "submit", "demo", "--priority", "99")
            assert bad.returncode == 1
            assert "invalid_request" in one_clean_line(bad)
            # --no-wait says it did not wait, and how to see the outcome; that command shows it.
            fired = jlm(settings, "submit", "demo", "--priority", "99", "--no-wait")
            assert fired.returncode == 0
            assert "not waiting for the daemon's decision" in fired.stdout
            see = fired.stdout.split("`")[1]
            assert see.startswith("jlm events")
            time.sleep(0.5)
            shown = jlm(settings, *see.split()[1:], "--json")
            assert [e["type"] for e in _events_of(shown)] == ["request.rejected"]
            # --wait is still accepted (the default); the reply says whether a running job stopped.
            first = jlm(settings, "submit", "demo", "--wait", "--json")
            assert first.returncode == 0, first.stderr
            reply = json.loads(first.stdout)
            assert reply["running_cancelled"] is False
            first_id = reply["new_job_id"]
            second = jlm(settings, "submit", "demo", "--json")
            second_id = json.loads(second.stdout)["new_job_id"]
            # --job, --type, --scope and --since filter the stream.
            mine = _events_of(jlm(settings, "events", "--json", "--job", first_id))
            assert [e["type"] for e in mine] == ["job.enqueued", "job.superseded"]
            sup = _events_of(jlm(settings, "events", "--json", "--type", "job.sup*"))
            assert [e["job_id"] for e in sup] == [first_id]
            scoped = _events_of(jlm(settings, "events", "--json", "--scope", "job/demo"))
            assert len(scoped) == 3
            assert _events_of(jlm(settings, "events", "--json", "--scope", "other/demo")) == []
            assert len(_events_of(jlm(settings, "events", "--json", "--since", "10m"))) == 5
            later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
            assert _events_of(jlm(settings, "events", "--json", "--since", later)) == []
            # --follow prints only what arrives after it started.
            with subprocess.Popen(
                [sys.executable, "-m", "jlm", "events", "--follow", "--json"],
                env=env_for(settings),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ) as follow:
                try:
                    assert follow.stderr is not None
                    assert follow.stdout is not None
                    assert "following jlm.provenance" in follow.stderr.readline()
                    third = jlm(settings, "submit", "demo", "--json")
                    third_id = json.loads(third.stdout)["new_job_id"]
                    seen = [json.loads(follow.stdout.readline()) for _ in range(2)]
                finally:
                    follow.terminate()
            assert {e["type"] for e in seen} == {"job.superseded", "job.enqueued"}
            assert {e["job_id"] for e in seen} == {second_id, third_id}
            # A job that is queued can be cancelled; the hint for a running one is tested below.
            cancel = jlm(settings, "cancel", third_id)
            assert cancel.returncode == 0
            assert "cancelled (" in cancel.stdout
            assert daemon.terminate_blocking() == 0
        finally:
            daemon.kill()


@pytest.mark.unit
def test_cancel_of_a_running_job_says_add_running() -> None:
    text = describe("cancel", {"job_id": "j", "cancelled": False, "state": "running"})
    assert text == "job j: not cancelled (running): add --running to stop it"
    assert "add --running" not in describe(
        "cancel", {"job_id": "j", "cancelled": True, "state": "cancelled"}
    )
    reply = {"new_job_id": "j", "state": "queued", "running_cancelled": True}
    assert "the running job was stopped" in describe("submit", reply)


def test_until_done_and_the_worker_log_one_line_per_job(settings: Settings, tmp_path: Path) -> None:
    with (
        DaemonProcess.of(settings, tmp_path) as daemon,
        (tmp_path / "worker.log").open("w") as worker_log,
    ):
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jlm",
                "worker",
                "tests.worker_handlers:count",
                "--job-type",
                "demo",
            ],
            env=env_for(settings, JLM_LOG_FORMAT="json"),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=worker_log,
        )
        try:
            daemon.wait_ready_blocking()
            done = jlm(
                settings, "submit", "demo", "--payload", '{"n": 1}', "--until-done", "--json"
            )
            assert done.returncode == 0, done.stderr
            reply = json.loads(done.stdout)
            assert reply["state"] == "succeeded"
            assert reply["result"] == {"job": reply["new_job_id"], "echo": {"n": 1}}
            # On a terminal, each state change is shown while it waits.
            shown = on_a_terminal(
                settings, "submit", "demo", "--payload", '{"n": 2}', "--until-done"
            )
            assert re.search(r"jlm: job \S+: pending", shown), shown
            assert re.search(r"jlm: job \S+: succeeded \(\d+\.\ds\)", shown), shown
        finally:
            worker.terminate()
            worker.wait(30)
            daemon.terminate_blocking()
            daemon.kill()
    records = [json.loads(line) for line in (tmp_path / "worker.log").read_text().splitlines()]
    about = [r["msg"] for r in records if r.get("job_id") == reply["new_job_id"]]
    assert about[0].startswith(f"job {reply['new_job_id']} started: job/demo, attempt 1")
    assert about[-1].startswith(f"job {reply['new_job_id']} succeeded after ")
    assert [r["level"] for r in records if r.get("job_id") == reply["new_job_id"]] == [
        "info",
        "info",
    ]


def on_a_terminal(settings: Settings, *args: str) -> str:
    """Run `jlm ARGS` with stderr on a pseudo-terminal; return what it wrote there."""
    main, secondary = pty.openpty()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "jlm", *args],
            env=env_for(settings),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=secondary,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0
        os.close(secondary)
        secondary = -1
        chunks = []
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(main)
        if secondary >= 0:
            os.close(secondary)


@pytest.mark.parametrize("command", ["run", "worker"])
def test_daemon_and_worker_exit_78_on_a_refused_login(settings: Settings, command: str) -> None:
    """A login refused at start is a configuration error for both, not a reason to retry."""
    host = AMQP_BASE.split("@", 1)[1]
    args = [command] if command == "run" else [command, "tests.worker_handlers:count"]
    if command == "worker":
        args += ["--job-type", "demo"]
    out = jlm(
        settings,
        *args,
        timeout=60,
        JLM_AMQP_URL=f"amqp://guest:s3cr3tpw@{host}/",
        JLM_METRICS_ADDR=f"127.0.0.1:{free_port()}",
        JLM_LOG_FORMAT="text",
    )
    assert out.returncode == 78, out.stderr
    assert "login refused" in out.stderr
    assert "Traceback" not in out.stderr
    assert "s3cr3tpw" not in out.stderr


@pytest.mark.unit
def test_completion_scripts_load_and_complete() -> None:
    parser = build_parser()
    bash = script(parser, "bash")
    probe = (
        "COMP_WORDS=(jlm sub); COMP_CWORD=1; _jlm_complete; echo ${COMPREPLY[@]}; "
        "COMP_WORDS=(jlm submit --pol); COMP_CWORD=2; _jlm_complete; echo ${COMPREPLY[@]}; "
        "COMP_WORDS=(jlm submit --policy re); COMP_CWORD=3; _jlm_complete; echo ${COMPREPLY[@]}; "
        "COMP_WORDS=(jlm completion z); COMP_CWORD=2; _jlm_complete; echo ${COMPREPLY[@]}"
    )
    loaded = subprocess.run(
        ["bash", "-c", f"source <({sys.executable} -m jlm completion bash) && {probe}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.splitlines() == ["submit", "--policy", "replace reuse", "zsh"]
    assert "complete -F _jlm_complete jlm" in bash
    fish = script(parser, "fish")
    assert "complete -c jlm -n __fish_use_subcommand -a submit" in fish
    assert "-l policy -xa 'replace skip reuse debounce'" in fish


@pytest.mark.unit
def test_completion_script_loads_in_zsh() -> None:
    loaded = subprocess.run(
        [
            require_tool("zsh", "zsh"),
            "-c",
            f"source <({sys.executable} -m jlm completion zsh) && print -r -- ${{_comps[jlm]}}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stderr == ""
    assert loaded.stdout.strip() != ""


@pytest.mark.unit
def test_event_filters_and_since() -> None:
    event = {"job_id": "j1", "request_id": "r1", "type": "job.enqueued"}
    event["scope"] = {"cache_prefix": "p", "job_type": "t"}  # type: ignore[assignment]
    assert Filter().matches(event)
    assert Filter(job="j1", request="r1", scope="p/t", type="job.*").matches(event)
    assert not Filter(job="j2").matches(event)
    assert not Filter(scope="p/u").matches(event)
    assert not Filter(type="request.*").matches(event)
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 12, 2, 7, 0, tzinfo=UTC)
    assert parse_since("10m", now) == now - timedelta(minutes=10)
    assert parse_since("1.5h", now) == now - timedelta(hours=1.5)
    assert parse_since("2026-12-02T06:00:00Z") == datetime(2026, 12, 2, 6, tzinfo=UTC)
    assert parse_since("2026-12-02T06:00:00") == datetime(2026, 12, 2, 6, tzinfo=UTC)
    with pytest.raises(ValueError, match="duration"):
        parse_since("10 minutes")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("JLM_PREFTCH", "JLM_PREFETCH"),
        ("JLM_AMQP_ULR", "JLM_AMQP_URL"),
        ("JLM_REDIS_NAMSPACE", "JLM_REDIS_NAMESPACE"),
        ("JLM_LOGLEVEL", "JLM_LOG_LEVEL"),
        ("JLM_AMQP_URL_FLIE", "JLM_AMQP_URL_FILE"),
        ("JLM_NOT_A_SETTING", None),
        ("JLM_TEST_AMQP_BASE", None),
    ],
)
def test_the_closest_known_variable_is_suggested(name: str, hint: str | None) -> None:
    warning = unknown_variable(name)
    assert warning.startswith(f"{name} is not a setting: ignored")
    if hint is None:
        assert "did you mean" not in warning
    else:
        assert warning.endswith(f"(did you mean {hint}?)")


async def test_a_permission_the_broker_refuses_is_one_line(settings: Settings, vhost: str) -> None:
    """A user allowed to ask for a status but not to submit: exit 78, one line, no traceback."""
    grants = dict(PUBLISHER_GRANTS, topic_write=r"^status$")
    user = new_user("cli", **grants)
    add_shared_users([user], vhost)
    running = await start_daemon(settings)
    try:
        host = AMQP_BASE.split("@", 1)[1]
        out = await asyncio.to_thread(
            jlm, settings, "submit", "demo", JLM_AMQP_URL=user.url(host, vhost)
        )
    finally:
        await running.stop()
        delete_shared_users([user])
    assert out.returncode == 78, out.stderr
    line = one_clean_line(out)
    assert "ACCESS_REFUSED" in line
    assert user.password not in line
