"""Real ``celery worker`` processes for the tests, started through ``manage.py celery``."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = Path(settings.BUILD_DIR) / "logs"


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the test process dies.

    A pytest run that is killed skips fixture teardown; without this its
    workers would live on and consume the next run's tasks.
    """
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class WorkerProcess:
    """One ``manage.py celery <alias> worker`` subprocess and its log file."""

    def __init__(self, alias: str, *, concurrency: int = 2, pool: str = "prefork",
                 settings_module: str = "tests.settings", tag: str = "",
                 env: Mapping[str, str] | None = None, app=None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.alias = alias
        self.name = f"{alias}{tag}-{os.getpid()}@{socket.gethostname()}"
        self.concurrency = concurrency
        self.pool = pool
        self.settings_module = settings_module
        self.env = {**os.environ, "DJANGO_SETTINGS_MODULE": settings_module,
                    "TEST_USE_TEST_DB": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.extra_args = extra_args
        self._app = app
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{self.name.partition('@')[0]}.log"
        self.process: subprocess.Popen | None = None

    @property
    def app(self):
        if self._app is None:
            from django_celery_adv.registry import apps

            self._app = apps[self.alias]
        return self._app

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        command = [
            sys.executable, str(ROOT / "manage.py"), "celery", self.alias, "worker",
            "-P", self.pool, "-c", str(self.concurrency), "-n", self.name, "-l", "info",
            "--without-gossip", "--without-mingle", *self.extra_args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        self.process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_die_with_parent)
        log.close()
        self.wait_ready(timeout)
        return self

    def ping(self, timeout: float = 1.0) -> dict:
        # A connection of its own: a pooled one may have been idle long enough
        # for the broker to drop it (missed heartbeats) while other tests ran.
        with self.app.connection_for_write() as connection:
            inspector = self.app.control.inspect(destination=[self.name], timeout=timeout,
                                                 limit=1, connection=connection)
            return inspector.ping() or {}

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited with {self.process.returncode}"
                                   f"\n{self.log_tail()}")
            if self.name in self.ping(timeout=0.5):
                return
        self.stop()
        raise RuntimeError(f"worker {self.name} did not answer ping in {timeout}s"
                           f"\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
