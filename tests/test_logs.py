"""Log lines: the syslog priority prefix when stderr is the journal (sd-daemon(3))."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.support.ports import free_port

from jlm.logs import JournalFormatter, JsonFormatter, TextFormatter, priority, to_journal

ROOT = Path(__file__).resolve().parent.parent


def record(level: int, msg: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("jlm.test", level, __file__, 1, msg, None, exc_info)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("level", "prio"),
    [
        (logging.DEBUG, 7),
        (logging.INFO, 6),
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (logging.CRITICAL, 2),
        (logging.INFO + 5, 6),
        (logging.DEBUG - 5, 7),
    ],
)
def test_priorities_follow_sd_daemon(level: int, prio: int) -> None:
    assert priority(level) == prio
    line = JournalFormatter(JsonFormatter()).format(record(level, "hello"))
    assert line.startswith(f"<{prio}>{{")
    assert json.loads(line[len(f"<{prio}>") :])["msg"] == "hello"


@pytest.mark.unit
def test_every_line_of_a_text_record_carries_the_prefix() -> None:
    lines = JournalFormatter(TextFormatter()).format(record(logging.ERROR, "a\nb", exc=True))
    assert len(lines.split("\n")) > 4  # the message's two lines and the traceback
    assert all(line.startswith("<3>") for line in lines.split("\n"))
    one = JournalFormatter(JsonFormatter()).format(record(logging.ERROR, "a\nb", exc=True))
    assert "\n" not in one
    assert one.startswith("<3>")


@pytest.mark.unit
def test_the_journal_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "stderr").open("w") as stream, (tmp_path / "other").open("w") as other:
        st = os.fstat(stream.fileno())
        named = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert to_journal(stream, named)
        assert not to_journal(other, named)  # inherited, but stderr goes elsewhere
        assert not to_journal(stream, {})
        for bad in ("", ":", "x:y", f"{st.st_dev}", f"{st.st_dev}:{st.st_ino}:1"):
            assert not to_journal(stream, {"JOURNAL_STREAM": bad})
    assert not to_journal(io.StringIO(), named)


def _run_daemon(tmp_path: Path, journal: bool, **extra: str) -> list[str]:
    """`jlm run` with stderr on a file (the journal when `journal`), both servers down, until
    it has said so; its stderr lines."""
    err_path = tmp_path / f"stderr-{journal}"
    closed = free_port()
    with err_path.open("wb") as err:
        st = os.fstat(err.fileno())
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
        env |= {
            "PYTHONPATH": str(ROOT / "daemon"),
            "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}" if journal else f"{st.st_dev}:1",
            "JLM_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{closed}/",
            "JLM_REDIS_URL": f"redis://127.0.0.1:{closed}/0",
            "JLM_METRICS_ADDR": "127.0.0.1:0",
            "JLM_LOG_LEVEL": "DEBUG",
            **extra,
        }
        proc = subprocess.Popen([sys.executable, "-m", "jlm", "run"], env=env, stderr=err)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                text = err_path.read_text(errors="replace")
                if "rabbitmq is down" in text and "redis is down" in text:
                    break
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return err_path.read_text().splitlines()


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_daemon_prefixes_its_lines_only_on_the_journal(fmt: str, tmp_path: Path) -> None:
    lines = _run_daemon(tmp_path, True, JLM_LOG_FORMAT=fmt)
    assert lines
    assert all(line[:3] in ("<7>", "<6>", "<4>", "<3>") for line in lines), lines
    by_text = {line[3:]: line[:3] for line in lines}
    starting = [p for t, p in by_text.items() if "starting: broker" in t]
    down = [p for t, p in by_text.items() if "rabbitmq is down" in t or "redis is down" in t]
    assert starting == ["<6>"]
    assert down == ["<4>", "<4>"]
    if fmt == "json":
        levels = {json.loads(t)["level"]: p for t, p in by_text.items()}
        assert levels["info"] == "<6>"
        assert levels["warning"] == "<4>"
    plain = _run_daemon(tmp_path, False, JLM_LOG_FORMAT=fmt)
    assert plain
    assert not any(line.startswith("<") for line in plain), plain


@pytest.mark.unit
def test_a_configuration_error_on_the_journal_is_an_error(tmp_path: Path) -> None:
    err_path = tmp_path / "stderr"
    with err_path.open("wb") as err:
        st = os.fstat(err.fileno())
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT / "daemon")}
        env |= {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "JLM_PREFETCH": "x"}
        code = subprocess.run(
            [sys.executable, "-m", "jlm", "run"], env=env, stderr=err, timeout=60, check=False
        ).returncode
    assert code == 78
    (line,) = err_path.read_text().splitlines()
    assert line.startswith("<3>jlm: configuration error: JLM_PREFETCH: ")
