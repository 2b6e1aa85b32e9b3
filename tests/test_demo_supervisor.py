"""The demo launcher's supervisor on real child processes standing in for workers.

Issue 11: one crashed worker took the whole demo down (the admin included),
and the printed log tail omitted the "Unrecoverable error" line.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
from django.conf import settings

from demo_project.supervisor import Supervisor, error_line

CRITICAL_LINE = ("[2026-11-30 07:47:58,474: CRITICAL/MainProcess] Unrecoverable error: "
                 "JSONDecodeError('Expecting value: line 1 column 1 (char 0)')")
# A traceback longer than the 20-line tail the old launcher printed.
TRACEBACK = "Traceback (most recent call last):\n" + "".join(
    f'  File "/lib/module{n}.py", line {n}, in f{n}\n    call_{n}()\n' for n in range(15)
) + "json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)\n"


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


@pytest.fixture
def log_dir() -> Path:
    path = Path(settings.BUILD_DIR) / f"supervisor-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir(parents=True)
    return path


def test_error_line_finds_the_critical_line_above_a_long_traceback():
    log = f"starting\n{CRITICAL_LINE}\n{TRACEBACK}\nworker: Warm shutdown\n"
    assert error_line(log) == CRITICAL_LINE


def test_error_line_without_a_critical_line_is_the_traceback_exception():
    log = f"Performing system checks...\n{TRACEBACK}Exiting.\n"
    assert error_line(log) == ("json.decoder.JSONDecodeError: Expecting value: "
                               "line 1 column 1 (char 0)")


def test_error_line_is_not_a_task_traceback_further_up():
    last = "[2026-11-30 08:20:01,002: INFO/MainProcess] Task demo.tasks.add[1] received"
    log = f"[..: ERROR/ForkPoolWorker-1] Task demo.tasks.charge_invoice raised\n{TRACEBACK}{last}\n"
    assert error_line(log) == last


def test_error_line_of_a_killed_process_is_its_critical_line_or_its_last():
    log = f"{CRITICAL_LINE}\n{TRACEBACK}[..: INFO/MainProcess] Task demo.tasks.add[1] received\n"
    assert error_line(log, signalled=True) == CRITICAL_LINE
    assert error_line(f"{TRACEBACK}Exiting.\n", signalled=True) == "Exiting."


def test_a_crashed_child_is_restarted_with_backoff_the_others_keep_running(log_dir):
    """Crashes twice (its error line reported each time), then stays up; "web" never stops."""
    counter = log_dir / "starts"
    crashing = python(f"""
        import pathlib, sys, time
        counter = pathlib.Path({str(counter)!r})
        starts = int(counter.read_text() or 0) + 1 if counter.exists() else 1
        counter.write_text(str(starts))
        if starts <= 2:
            print({CRITICAL_LINE!r})
            print({TRACEBACK!r})
            sys.exit(1)
        time.sleep(60)
    """)
    said: list[str] = []
    supervisor = Supervisor({"worker": crashing, "web": python("import time; time.sleep(60)")},
                            log_dir, say=said.append, backoff=0.3)
    supervisor.start()
    worker, web = supervisor.children
    web_pid = web.process.pid
    try:
        deadline = time.monotonic() + 20
        while not counter.exists() or counter.read_text() != "3" or worker.exited():
            assert time.monotonic() < deadline, said
            supervisor.poll()
            time.sleep(0.05)
        crashes = [line for line in said if "exited with 1" in line]
        assert len(crashes) == 2, said
        assert all(CRITICAL_LINE in line for line in crashes), crashes
        assert "restarting it in 0.3 s" in crashes[0] and "restarting it in 0.6 s" in crashes[1]
        assert (web.process.pid, web.exited()) == (web_pid, False)
    finally:
        supervisor.stop()
    assert worker.exited() and web.exited()


def test_a_child_hanging_after_warm_shutdown_is_killed_at_the_deadline(log_dir):
    """It ignores SIGTERM and so does a process it started: both are gone after ``grace``."""
    grandchild_pid = log_dir / "grandchild.pid"
    hanging = python(f"""
        import pathlib, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, lambda *a: print("worker: Warm shutdown", flush=True))
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
        pathlib.Path({str(grandchild_pid)!r}).write_text(str(child.pid))
        while True:
            time.sleep(0.1)
    """)
    said: list[str] = []
    supervisor = Supervisor({"worker": hanging, "beat": python("import time; time.sleep(60)")},
                            log_dir, say=said.append, grace=2.0)
    supervisor.start()
    deadline = time.monotonic() + 20
    while not grandchild_pid.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pool_pid = int(grandchild_pid.read_text())
    started = time.monotonic()
    assert supervisor.stop() is False
    elapsed = time.monotonic() - started
    assert 2.0 <= elapsed < 3.5, said
    assert "  beat stopped" in said[1], said
    assert "worker still running after 2." in said[2] and said[2].endswith("killed"), said
    assert "Warm shutdown" in (log_dir / "worker.log").read_text()
    assert not Path(f"/proc/{pool_pid}").exists() or \
        Path(f"/proc/{pool_pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
