"""``python -m demo_project.launch`` as a user runs it: closing the terminal stops everything.

Issue 11: SIGHUP killed the launcher and left its 8 processes running with the
admin still answering; the next run failed with "port already in use".
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings

from tests.faults.servers import listening, spare_port, wait_until

pytestmark = pytest.mark.workers

ROOT = Path(__file__).resolve().parent.parent


def _sessions() -> dict[int, int]:
    """pid -> session id of every live (non-zombie) process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z":
            found[int(entry.name)] = int(fields[3])  # state ppid pgrp session
    return found


def _descendants(root: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rpartition(")")[2].split()[1])
            except OSError:
                continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class Demo:
    """One launcher run on a spare port and a var dir of its own."""

    def __init__(self, var_dir: Path, port: int) -> None:
        self.var_dir, self.port = var_dir, port
        self.sessions: set[int] = set()
        self.output = var_dir / f"launch-{time.monotonic_ns()}.out"
        self.env = {**os.environ, "DJANGO_SETTINGS_MODULE": "demo_project.settings",
                    "DEMO_VAR_DIR": str(var_dir), "DEMO_PORT": str(port),
                    "DEMO_ADMIN_PASSWORD": "demo-test", "PYTHONUNBUFFERED": "1"}
        for name in ("DEMO_DEFAULT_BROKER", "DEMO_GLOBAL_BROKER", "TEST_USE_TEST_DB"):
            self.env.pop(name, None)
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "demo_project.launch"],
                                            cwd=ROOT, env=self.env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_up(self) -> None:
        url = f"http://127.0.0.1:{self.port}/admin/login/"
        wait_until(lambda: _answers(url) or self.process.poll() is not None, 120,
                   f"the admin at {url}")
        assert self.process.poll() is None, self.text()
        logs = self.var_dir / "logs"
        wait_until(lambda: all("ready." in (logs / f"worker-{alias}.log").read_text()
                               for alias in ("default", "global")), 60, "both workers ready")

    def remaining(self) -> set[int]:
        """Live processes of the launcher's session and of the sessions its children made."""
        return {pid for pid, sid in _sessions().items() if sid in self.sessions}

    def stop_with(self, signum: int, timeout: float = 15.0) -> tuple[float, set[int]]:
        """Send ``signum``; how long until all were gone (or ``timeout``), and who is left."""
        children = _descendants(self.process.pid) | {self.process.pid}
        self.sessions = {sid for pid, sid in _sessions().items() if pid in children}
        started = time.monotonic()
        self.process.send_signal(signum)
        while (self.process.poll() is None or self.remaining()) \
                and time.monotonic() - started < timeout:
            time.sleep(0.1)
        return time.monotonic() - started, self.remaining()

    def kill(self) -> None:
        """Clean up whatever a failed test left behind (by pid, never by name)."""
        for pid in self.remaining() | _descendants(self.process.pid) | {self.process.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(5)


def _check_send_demo_tasks(demo: Demo) -> None:
    """Every line names the worker that ran the task, and the right one; no "None: None"."""
    done = subprocess.run([sys.executable, "manage.py", "send_demo_tasks"], cwd=ROOT,
                          env=demo.env, capture_output=True, text=True, timeout=120)
    print(done.stdout, done.stderr[-2000:])
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 11
    on_global = ("collect_stats", "build_report", "nightly_report")
    for line in lines:
        alias = "global" if any(name in line for name in on_global) else "default"
        assert f"[ran on {alias}@" in line, line
        assert "None" not in line, line
    assert "dropped, not queued" in lines[6]


def _check_a_killed_worker_is_restarted_and_the_admin_stays_up(demo: Demo) -> None:
    worker = next(pid for pid in _descendants(demo.process.pid)
                  if b"celery\0default\0worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
                  and _parent(pid) == demo.process.pid)
    log = demo.var_dir / "logs" / "worker-default.log"
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: "restarting worker-default" in demo.text(), 30, "the restart")
    wait_until(lambda: log.read_text().count("ready.") == 2, 60, "the new worker ready")
    assert "worker-default was killed by SIGKILL after" in demo.text(), demo.text()
    assert _answers(f"http://127.0.0.1:{demo.port}/admin/login/")
    assert demo.process.poll() is None


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


@pytest.fixture
def var_dir() -> Path:
    path = Path(settings.BUILD_DIR) / f"demo-launch-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_sighup_stops_everything_in_10s_and_the_next_run_starts(var_dir):
    port = spare_port()
    demo = Demo(var_dir, port)
    try:
        demo.wait_up()
        _check_send_demo_tasks(demo)
        _check_a_killed_worker_is_restarted_and_the_admin_stays_up(demo)
        elapsed, remaining = demo.stop_with(signal.SIGHUP)
        print(f"SIGHUP: launcher exited {demo.process.returncode} after {elapsed:.1f}s, "
              f"{len(remaining)} processes left, port free: {not listening(port)}")
        assert remaining == set()
        assert elapsed < 10, demo.text()
        assert not listening(port)
        assert "stopped" in demo.text()  # progress was printed while stopping
    finally:
        demo.kill()

    again = Demo(var_dir, port)
    try:
        again.wait_up()
        elapsed, remaining = again.stop_with(signal.SIGTERM)
        assert (remaining, elapsed < 10) == (set(), True), again.text()
    finally:
        again.kill()


def test_a_taken_port_is_reported_with_its_holder_before_anything_starts(var_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "demo_project.settings",
               "DEMO_VAR_DIR": str(var_dir / "taken"), "DEMO_PORT": str(port)}
        done = subprocess.run([sys.executable, "-m", "demo_project.launch"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
    print(done.stdout)
    assert done.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use by pid {os.getpid()} (" in done.stdout
    assert "DEMO_PORT=" in done.stdout and "admin:" not in done.stdout
    assert not (var_dir / "taken" / "demo.sqlite3").exists()  # nothing was touched
