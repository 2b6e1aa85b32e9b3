"""CELERY_ADV["LOGGING"] on real worker processes, and the hook's pieces in-process.

Worker tests start ``manage.py celery <alias> worker`` with
``tests.logging_settings`` (the logging chosen by env vars), each on a queue
of its own so no other worker of the session takes its tasks. Syslog lines
are read from a UDP socket the test binds on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from django.test import override_settings
from django.utils.module_loading import import_string

from django_celery_adv import logconfig
from django_celery_adv.registry import apps, using
from tests.testapp.failing_tasks import log_line
from tests.workers import ROOT, WorkerProcess

pytestmark = pytest.mark.workers
RESULT_TIMEOUT = 30
CELERY_FORMAT_LINE = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+: %s/%s\] "


# -- fixtures -----------------------------------------------------------------

@pytest.fixture
def syslog_socket() -> Iterator[socket.socket]:
    """A syslog "server": a UDP socket on 127.0.0.1, on a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    yield sock
    sock.close()


def receive_until(sock: socket.socket, done: Callable[[list[str]], bool],
                  timeout: float = 20.0) -> list[str]:
    """Syslog messages (priority prefix kept, NUL stripped) until ``done(messages)``."""
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done(messages):
        try:
            data = sock.recv(65535)
        except TimeoutError:
            continue
        messages.append(data.decode("utf-8", "replace").rstrip("\x00"))
    return messages


@pytest.fixture
def start_worker() -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers on queues of their own with ``tests.logging_settings``; stop them after."""
    started: list[WorkerProcess] = []

    def start(alias: str, tag: str, **env: str) -> WorkerProcess:
        queue = f"{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        worker = WorkerProcess(alias, tag=f"-{tag}", settings_module="tests.logging_settings",
                               concurrency=1, env=env, extra_args=("-Q", queue))
        worker.queue = queue
        if worker.log_path.exists():
            worker.log_path.unlink()  # one run's lines only
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()


def send_log_line(worker: WorkerProcess, marker: str) -> str:
    with using(worker.alias):
        result = log_line.apply_async((marker,), queue=worker.queue)
    task_id = result.get(timeout=RESULT_TIMEOUT)
    assert task_id == result.id
    return task_id


def wait_for_log(worker: WorkerProcess, pattern: str, timeout: float = 10.0) -> str:
    """The worker's log file once ``pattern`` matches it (it is written asynchronously)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = worker.log_path.read_text(errors="replace")
        if re.search(pattern, text, re.MULTILINE):
            return text
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in the log of {worker.name}:\n{text[-3000:]}")


@pytest.fixture
def logging_state() -> Iterator[None]:
    """Put the root logger and every logger's enabled flag back after an in-process test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    disabled = {name: logger.disabled for name, logger in logging.Logger.manager.loggerDict.items()
                if isinstance(logger, logging.Logger)}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
        handler.filters = [f for f in handler.filters
                           if not isinstance(f, logconfig.TaskContextFilter)]
    root.setLevel(level)
    for name, flag in disabled.items():
        logging.getLogger(name).disabled = flag


# -- real workers ---------------------------------------------------------------

def test_syslog_receives_worker_and_task_lines_with_alias_and_task_id(start_worker,
                                                                       syslog_socket):
    port = syslog_socket.getsockname()[1]
    worker = start_worker("default", "syslog", TEST_LOGGING="syslog",
                          TEST_SYSLOG_PORT=str(port))
    marker = uuid.uuid4().hex

    task_id = send_log_line(worker, marker)
    messages = receive_until(syslog_socket,
                             lambda got: sum(f"line {marker}" in m for m in got) >= 2)

    # facility local0 (16) * 8 + INFO (6) = 134: the handler's facility is applied.
    ready = [m for m in messages if f"{worker.name} ready." in m]
    assert ready, messages
    assert ready[0].startswith("<134>celery[")
    assert "[default - -] celery.apps.worker:" in ready[0]
    task_lines = [m for m in messages if f"line {marker}" in m]
    assert len(task_lines) == 2, messages
    assert all(f"[default testapp.log_line {task_id}]" in m for m in task_lines)
    assert any(m.startswith("<134>") and f"task line {marker}" in m for m in task_lines)
    assert any(m.startswith("<132>") and f"plain line {marker}" in m for m in task_lines)
    # the console handler of syslog_logging() carries the same fields
    wait_for_log(worker, rf"\[default testapp\.log_line {task_id}\] task line {marker}")


def test_beat_logs_through_the_same_setting(syslog_socket, tmp_path):
    port = syslog_socket.getsockname()[1]
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.logging_settings",
           "TEST_LOGGING": "syslog", "TEST_SYSLOG_PORT": str(port), "TEST_USE_TEST_DB": "1"}
    with open(tmp_path / "beat.log", "wb") as log:
        beat = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "celery", "default", "beat", "-l", "info",
             "-s", str(tmp_path / "schedule"), "--pidfile="],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        messages = receive_until(syslog_socket,
                                 lambda got: any("beat: Starting..." in m for m in got))
    finally:
        os.killpg(beat.pid, signal.SIGTERM)
        try:
            beat.wait(15)
        except subprocess.TimeoutExpired:  # a beat that ignores SIGTERM must not outlive us
            os.killpg(beat.pid, signal.SIGKILL)
            beat.wait(5)

    starting = [m for m in messages if "beat: Starting..." in m]
    assert starting, (tmp_path / "beat.log").read_text()
    assert starting[0].startswith("<134>celery[")
    assert "INFO [default - -] celery.beat: beat: Starting..." in starting[0]


def test_an_apps_own_logging_applies_to_its_workers_only(start_worker, syslog_socket):
    port = syslog_socket.getsockname()[1]
    env = {"TEST_LOGGING": "syslog-twin", "TEST_SYSLOG_PORT": str(port)}
    twin = start_worker("twin", "twinjson", **env)
    default = start_worker("default", "twinplain", **env)
    twin_marker, default_marker = uuid.uuid4().hex, uuid.uuid4().hex

    twin_task = send_log_line(twin, twin_marker)
    default_task = send_log_line(default, default_marker)
    messages = receive_until(syslog_socket,
                             lambda got: sum(f"line {twin_marker}" in m for m in got) >= 2)

    records = [json.loads(m.partition(">")[2]) for m in messages]
    task_records = [r for r in records if f"line {twin_marker}" in r["message"]]
    assert {r["message"] for r in task_records} == {f"task line {twin_marker}",
                                                  f"plain line {twin_marker}"}
    for record in task_records:
        assert (record["alias"], record["task_name"], record["task_id"]) == \
            ("twin", "testapp.log_line", twin_task)
    assert any(r["message"] == f"{twin.name} ready." and r["alias"] == "twin"
               for r in records)
    # The default app has no LOGGING of its own: Celery's setup, nothing to syslog.
    assert not any(default_marker in m or default.name in m for m in messages)
    text = wait_for_log(default, CELERY_FORMAT_LINE % ("INFO", r"ForkPoolWorker-\d+")
                        + rf"testapp\.log_line\[{default_task}\]: task line {default_marker}")
    assert re.search(CELERY_FORMAT_LINE % ("INFO", "MainProcess") + re.escape(
        f"{default.name} ready."), text)


def test_none_leaves_celerys_own_format(start_worker):
    assert not logconfig.is_connected()  # tests.settings: LOGGING None, no app's own
    worker = start_worker("default", "plainlog")
    marker = uuid.uuid4().hex

    task_id = send_log_line(worker, marker)

    # Celery's TaskFormatter for task loggers, its worker format for the others.
    text = wait_for_log(worker, CELERY_FORMAT_LINE % ("INFO", r"ForkPoolWorker-\d+")
                        + rf"testapp\.log_line\[{task_id}\]: task line {marker}$")
    assert re.search(CELERY_FORMAT_LINE % ("WARNING", r"ForkPoolWorker-\d+")
                     + rf"plain line {marker}$", text, re.MULTILINE)
    assert "[default " not in text  # none of our fields: our receiver never ran
    assert " -------------- " in text  # Celery's banner


def test_a_raising_hook_leaves_a_started_worker_with_the_fallback(start_worker, tmp_path):
    record = tmp_path / "hook.json"
    worker = start_worker("default", "badhook", TEST_LOGGING="hook",
                          TEST_HOOK_RECORD=str(record), TEST_HOOK_RAISE="1")
    marker = uuid.uuid4().hex

    assert worker.name in worker.ping(timeout=5)  # started and answering
    task_id = send_log_line(worker, marker)

    text = wait_for_log(worker, rf"\[{task_id}\]|plain line {marker}")
    assert "django-celery-adv: the logging hook CELERY_ADV['LOGGING'] failed; logging to a " \
           "console handler at level INFO instead." in text
    assert "Traceback (most recent call last):" in text
    assert "tests.logging_settings.HookExploded: hook exploded on purpose" in text
    # The fallback: a console handler at the requested level (INFO), Celery's format.
    assert re.search(CELERY_FORMAT_LINE % ("INFO", "MainProcess")
                     + re.escape(f"{worker.name} ready."), text)
    assert re.search(CELERY_FORMAT_LINE % ("INFO", r"ForkPoolWorker-\d+")
                     + rf"task line {marker}$", text, re.MULTILINE)
    # The hook got the setup_logging signal's arguments.
    arguments = json.loads(record.read_text())
    assert arguments == {"loglevel": logging.INFO, "logfile": None, "colorize": False,
                         "format": apps["default"].conf.worker_log_format}


# -- in-process: receiver wiring, dict handling, fallback, JSON ------------------

def test_receiver_is_connected_only_when_a_logging_setting_asks_for_it():
    try:
        with override_settings(CELERY_ADV={"APPS": {"default": {"broker_url": "memory://"}}}):
            assert logconfig.connect() is False
            assert not logconfig.is_connected()
        with override_settings(CELERY_ADV={"APPS": {"default": {"broker_url": "memory://",
                                                                "LOGGING": {"version": 1}}}}):
            assert logconfig.connect() is True
            assert logconfig.is_connected()
    finally:
        logconfig.disconnect()
    assert not logconfig.is_connected()


def test_an_apps_own_key_wins_over_the_global_value():
    config = {"APPS": {"default": {"broker_url": "memory://"},
                       "twin": {"broker_url": "memory://", "LOGGING": None},
                       "global": {"broker_url": "memory://", "LOGGING": {"version": 1}}},
              "LOGGING": "logging.basicConfig"}
    with override_settings(CELERY_ADV=config):
        assert logconfig.logging_config("default") == "logging.basicConfig"
        assert logconfig.logging_config("twin") is None
        assert logconfig.logging_config("global") == {"version": 1}
        assert logconfig.logging_config(None) == "logging.basicConfig"


def test_a_dict_keeps_existing_loggers_and_the_command_line_level(logging_state):
    existing = logging.getLogger("tests.already.there")
    config = {"version": 1, "handlers": {"null": {"class": "logging.NullHandler"}},
              "root": {"handlers": ["null"]}}

    logconfig.apply_config(config, loglevel=logging.WARNING)

    assert not existing.disabled  # dictConfig alone would have disabled it
    assert logging.getLogger().level == logging.WARNING
    assert config == {"version": 1, "handlers": {"null": {"class": "logging.NullHandler"}},
                      "root": {"handlers": ["null"]}}  # the setting is not consumed


def test_a_bad_dict_prints_the_traceback_and_installs_the_fallback(logging_state, capsys,
                                                                   monkeypatch):
    monkeypatch.setenv("CELERY_ADV_APP", "default")
    broken = {"version": 1, "handlers": {"x": {"class": "no.such.Handler"}},
              "root": {"handlers": ["x"]}}
    with override_settings(CELERY_ADV={"APPS": {"default": {"broker_url": "memory://"}},
                                       "LOGGING": broken}):
        logconfig.on_setup_logging(loglevel=logging.DEBUG, logfile=None,
                                   format="%(levelname)s|%(alias)s|%(message)s",
                                   colorize=False)

    err = capsys.readouterr().err
    assert "the logging hook CELERY_ADV['LOGGING'] failed" in err
    assert "Traceback (most recent call last):" in err
    assert "no.such.Handler" in err
    root = logging.getLogger()
    assert root.level == logging.DEBUG
    assert len(root.handlers) == 1
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    assert any(isinstance(f, logconfig.TaskContextFilter) for f in handler.filters)
    logging.getLogger("tests.fallback").debug("still logging")
    assert "DEBUG|default|still logging" in capsys.readouterr().err


def test_json_formatter_writes_alias_and_task_fields():
    spec = logconfig.json_formatter(static_fields={"service": "billing"})
    formatter = import_string(spec.pop("()"))(**spec)
    record = logging.LogRecord("tests.json", logging.ERROR, __file__, 1, "disk %s full",
                               ("/var",), None)
    logconfig.TaskContextFilter("global").filter(record)

    data = json.loads(formatter.format(record))

    assert data["message"] == "disk /var full"
    assert data["levelname"] == "ERROR"
    assert (data["alias"], data["task_name"], data["task_id"]) == ("global", "-", "-")
    assert data["service"] == "billing"


def test_syslog_logging_accepts_a_socket_path_or_host_and_port():
    local = logconfig.syslog_logging("/dev/log", facility="local3", level="WARNING",
                                     console=False)
    remote = logconfig.syslog_logging(("logs.example.com", 514), json=True)

    assert local["handlers"]["syslog"]["address"] == "/dev/log"
    assert local["handlers"]["syslog"]["facility"] == "local3"
    assert local["root"] == {"handlers": ["syslog"], "level": "WARNING"}
    assert remote["handlers"]["syslog"]["address"] == ("logs.example.com", 514)
    assert remote["handlers"]["syslog"]["formatter"] == "json"
    assert remote["root"] == {"handlers": ["syslog", "console"]}  # level: the worker's -l
