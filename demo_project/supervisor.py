"""Keep the demo's processes running, and stop them all, fast, when asked.

Guarantees:

* Every child runs in a session of its own (its process group is its pid),
  with its output in ``<log_dir>/<name>.log``, emptied when the supervisor
  starts (a fresh log each run; a restart appends).
* A child that exits while the supervisor runs is restarted after a backoff
  (``backoff`` seconds, doubled for each crash in a row up to ``max_backoff``;
  a child that ran ``stable_after`` seconds starts again from ``backoff``).
  Its real error line is reported: the last ``CRITICAL``/"Unrecoverable
  error" line of *that* run (which a plain log tail can miss), else the
  exception of a traceback ending its log, else its last line. The other children are not touched.
* :meth:`Supervisor.stop` sends SIGTERM to each child's main process (a Celery
  worker then finishes its tasks: warm shutdown), reports each one as it
  exits, SIGKILLs the group of any child still there at ``grace`` seconds (a
  worker hanging after "Warm shutdown"), and SIGKILLs every child's group at
  the end so no pool process outlives it. It returns within ``grace`` + 1 s.
* A child dies with the supervisor's process even if that is SIGKILLed
  (``PR_SET_PDEATHSIG``: the child gets SIGTERM).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CRITICAL = re.compile(r"CRITICAL|Unrecoverable error")
#: The exception line closing a traceback: "pkg.module.SomeError: message".
EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")


def error_line(log: str, *, signalled: bool = False) -> str:
    """The line of ``log`` that says why the process ended.

    The last CRITICAL/"Unrecoverable error" line; else, unless a signal ended
    the process (then its log does not say why), the exception line of a
    traceback that ends the log, followed by no log record (a task's
    traceback with records after it is not why a worker ended); else the
    last line.
    """
    lines = [line.rstrip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if CRITICAL.search(line):
            return line.strip()
    if not signalled and any(line.startswith("Traceback (most recent") for line in lines):
        for line in reversed(lines):
            if EXCEPTION.match(line):
                return line
            if line.startswith("["):  # a log record came after it
                break
    return lines[-1] if lines else "(its log is empty)"


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the supervisor's process dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    command: Sequence[str]
    log_path: Path
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    log_offset: int = 0
    crashes: int = 0
    restart_at: float | None = None

    def exited(self) -> bool:
        """Whether the main process has exited, *without* reaping it (see :meth:`reap`)."""
        if self.process is None or self.process.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, self.process.pid,
                             os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def reap(self) -> None:
        """SIGKILL the child's process group, then reap its main process.

        Until reaped, the main process is a zombie that keeps its pid, and so
        the group id, ours: the kill cannot reach a process that reused it.
        """
        if self.process is None or self.process.returncode is not None:
            return
        self.kill_group()
        self.process.wait()

    def kill_group(self) -> None:
        """SIGKILL the group while its leader is alive or unreaped (see :meth:`reap`)."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def log_since_start(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")


class Supervisor:
    """Start named commands, restart the ones that crash, stop them all on request."""

    def __init__(self, commands: Mapping[str, Sequence[str]], log_dir: Path, *,
                 cwd: Path | None = None, env: Mapping[str, str] | None = None,
                 say: Callable[[str], None] = print, backoff: float = 1.0,
                 max_backoff: float = 30.0, stable_after: float = 60.0,
                 grace: float = 8.5) -> None:
        self.children = [Child(name, list(command), log_dir / f"{name}.log")
                         for name, command in commands.items()]
        self.cwd, self.env, self.say = cwd, env, say
        self.backoff, self.max_backoff, self.stable_after = backoff, max_backoff, stable_after
        self.grace = grace
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        for child in self.children:
            child.log_path.write_bytes(b"")  # a fresh log each run
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        with open(child.log_path, "ab") as log:
            child.log_offset = log.tell()
            child.process = subprocess.Popen(
                child.command, cwd=self.cwd, env=self.env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent)
        child.started_at, child.restart_at = time.monotonic(), None

    def poll(self) -> None:
        """One supervision step: report and schedule crashed children, restart due ones."""
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self.say(f"restarting {child.name}")
                    self._spawn(child)
            elif child.process is not None and child.exited():
                child.reap()  # its pool children must not linger
                ran = now - child.started_at
                child.crashes = 1 if ran >= self.stable_after else child.crashes + 1
                delay = min(self.max_backoff, self.backoff * 2 ** (child.crashes - 1))
                child.restart_at = now + delay
                code = child.process.returncode
                how = (f"was killed by {signal.Signals(-code).name} after {ran:.0f} s; "
                       "its log ends with" if code < 0
                       else f"exited with {code} after {ran:.0f} s")
                self.say(f"{child.name} {how}: "
                         f"{error_line(child.log_since_start(), signalled=code < 0)}\n"
                         f"  (log: {child.log_path}); restarting it in {delay:g} s")

    def run(self, stopping: Callable[[], bool], interval: float = 0.2) -> None:
        """Supervise until ``stopping()`` says so."""
        while not stopping():
            self.poll()
            time.sleep(interval)

    def stop(self, hurry: Callable[[], bool] = lambda: False) -> bool:
        """Stop every child (see the module docstring); True if none had to be killed."""
        started = time.monotonic()
        waiting = [child for child in self.children if not child.exited()]
        self.say(f"stopping {', '.join(child.name for child in waiting) or 'nothing'} ...")
        for child in waiting:
            # The main process only: a Celery worker then shuts its pool down itself.
            with contextlib.suppress(ProcessLookupError):
                child.process.terminate()
        clean = True
        while waiting:
            for child in [child for child in waiting if child.exited()]:
                waiting.remove(child)
                child.reap()
                self.say(f"  {child.name} stopped ({time.monotonic() - started:.1f} s)")
            if waiting and (time.monotonic() - started >= self.grace or hurry()):
                late = time.monotonic() - started
                for child in waiting:
                    child.kill_group()  # all at once: each one's death takes a moment
                for child in waiting:
                    child.reap()
                    self.say(f"  {child.name} still running after {late:.1f} s: killed")
                waiting, clean = [], False
            time.sleep(0.05)
        for child in self.children:
            child.reap()  # children waiting for a restart, and pool processes left over
        return clean
