"""Real ``celery beat`` processes with ``LockedScheduler`` for the tests, and a
collector that counts what they send at the broker."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kombu import Connection, Exchange, Queue

from tests.workers import LOG_DIR, ROOT, _die_with_parent


class BeatProcess:
    """One ``manage.py celery <alias> beat -S django_celery_adv`` subprocess."""

    def __init__(self, alias: str, tag: str, *, beat: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.alias = alias
        self.env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.beat_settings",
                    "TEST_USE_TEST_DB": "1", "PYTHONUNBUFFERED": "1",
                    "TEST_BEAT": json.dumps(dict(beat or {})), **(env or {})}
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"beat-{alias}-{tag}-{os.getpid()}.log"
        self.process: subprocess.Popen | None = None
        self.scheduler = "django_celery_adv"

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> BeatProcess:
        command = [sys.executable, str(ROOT / "manage.py"), "celery", self.alias, "beat",
                   "-S", self.scheduler, "-l", "info", "--pidfile="]
        log = open(self.log_path, "wb")  # noqa: SIM115 (the child keeps it)
        self.process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_die_with_parent)
        log.close()
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.process.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a stopped beat is woken first), SIGKILL if it outlives ``timeout``."""
        if self.process is None:
            return
        for sig in (signal.SIGCONT, signal.SIGTERM):
            self.signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        self.signal(signal.SIGKILL)
        self.process.wait(5)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"


@dataclass
class Sent:
    """One message a beat sent, as the collector received it."""

    at: float  # time.monotonic() of arrival
    task: str
    token: int | None
    app: str | None


class Collector(threading.Thread):
    """Consumes one queue of one broker and records every message (no worker runs it)."""

    def __init__(self, broker_url: str, queue: str | None = None) -> None:
        super().__init__(daemon=True, name="beat-collector")
        self.broker_url = broker_url
        self.queue_name = queue or f"beat-test-{uuid.uuid4().hex[:10]}"
        self.sent: list[Sent] = []
        self._stop_event = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def queue(self) -> Queue:
        # What Celery creates for an unknown queue name (task_create_missing_queues).
        return Queue(self.queue_name, Exchange(self.queue_name, type="direct"),
                     routing_key=self.queue_name)

    def start(self) -> Collector:
        super().start()
        if not self._ready.wait(15):
            raise RuntimeError(f"collector on {self.queue_name} did not start: {self._error}")
        return self

    def run(self) -> None:
        try:
            with Connection(self.broker_url) as connection, connection.Consumer(
                    self.queue(), callbacks=[self._on_message], accept=["json"]):
                self._ready.set()
                while not self._stop_event.is_set():
                    with contextlib.suppress(TimeoutError, socket.timeout):
                        connection.drain_events(timeout=0.2)
        except BaseException as e:  # reported by start() / the assertions
            self._error = e
            self._ready.set()

    def _on_message(self, body: Any, message: Any) -> None:
        headers = message.headers or {}
        token = headers.get("x-beat-token")
        self.sent.append(Sent(time.monotonic(), headers.get("task", ""),
                              int(token) if token is not None else None,
                              headers.get("x-beat-app")))
        message.ack()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)

    def between(self, start: float, end: float) -> list[Sent]:
        return [sent for sent in list(self.sent) if start <= sent.at < end]
