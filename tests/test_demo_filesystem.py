"""The demo's embedded broker (filesystem): a real worker runs tasks and answers inspect.

The stress test is issue 11's reproduction: with kombu's stock ``filesystem``
transport a worker picked up a message file its writer had not filled yet and
died with ``Unrecoverable error: JSONDecodeError``.
"""

from __future__ import annotations

import importlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pytest

from django_celery_adv.registry import build_app
from tests.workers import WorkerProcess

pytestmark = pytest.mark.workers

TRANSPORT = "django_celery_adv.transports.filesystem:Transport"
TASKS, SENDERS, INSPECT_ROUNDS, INSPECTORS = 1000, 4, 300, 3


@pytest.fixture(scope="module")
def var_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-var")


@pytest.fixture(scope="module")
def demo_settings(var_dir):
    with mock.patch.dict(os.environ, {"DEMO_VAR_DIR": str(var_dir)}):
        os.environ.pop("DEMO_DEFAULT_BROKER", None)
        import demo_project.settings as module

        yield importlib.reload(module)


@pytest.fixture(scope="module")
def demo_worker(demo_settings, var_dir):
    """A worker of the demo's ``default`` app on the demo's own broker settings."""
    app = build_app("default", demo_settings.CELERY_ADV["APPS"]["default"])
    worker = WorkerProcess("default", settings_module="demo_project.settings", tag="-fs",
                           app=app, concurrency=2,
                           env={"DEMO_VAR_DIR": str(var_dir), "DEMO_DEFAULT_BROKER": ""})
    worker.start()
    yield worker
    worker.stop()


def test_filesystem_broker_runs_a_task_and_answers_ping(demo_worker):
    assert demo_worker.app.conf.broker_url == "filesystem://"
    assert demo_worker.app.conf.broker_transport == TRANSPORT
    replies = demo_worker.app.control.inspect(timeout=5, limit=1).ping()
    assert replies == {demo_worker.name: {"ok": "pong"}}
    assert demo_worker.app.send_task("demo.tasks.add", (20, 22)).get(timeout=30) == 42


def _collect(results: list, worker: WorkerProcess, timeout: float = 90.0) -> dict:
    """Every task's value; stops early (with what arrived) once the worker is dead."""
    values, deadline = {}, time.monotonic() + timeout
    for n, result in results:
        while n not in values and time.monotonic() < deadline:
            if result.ready():
                values[n] = result.get(timeout=1)
            elif worker.process.poll() is not None:
                return values
            else:
                time.sleep(0.05)
    return values


def test_worker_survives_inspect_rounds_and_tasks_from_threads(demo_worker):
    """300 inspect rounds and 1,000 tasks from 4 threads at once: the worker never dies."""
    app, worker = demo_worker.app, demo_worker
    results: list = []
    answered: list[int] = []

    def send(index: int) -> None:
        with app.connection_for_write() as connection:
            for n in range(index, TASKS, SENDERS):
                results.append((n, app.send_task("demo.tasks.add", (n, 1),
                                                 connection=connection)))

    def inspect(index: int) -> None:
        with app.connection_for_write() as connection:
            for _ in range(index, INSPECT_ROUNDS, INSPECTORS):
                if worker.process.poll() is not None:
                    return  # dead: the assertions below say so
                replies = app.control.inspect(destination=[worker.name], timeout=10, limit=1,
                                              connection=connection).ping() or {}
                answered.append(len(replies))

    started = time.monotonic()
    with ThreadPoolExecutor(SENDERS + INSPECTORS) as pool:
        futures = [pool.submit(send, i) for i in range(SENDERS)]
        futures += [pool.submit(inspect, i) for i in range(INSPECTORS)]
    errors = [future.exception() for future in futures if future.exception()]
    values = _collect(results, worker)
    elapsed = time.monotonic() - started
    print(f"{len(values)} results, {sum(answered)}/{INSPECT_ROUNDS} inspect replies "
          f"in {elapsed:.1f}s; worker alive: {worker.process.poll() is None}")
    assert errors == []
    assert worker.process.poll() is None, worker.log_tail()
    assert "Unrecoverable error" not in worker.log_path.read_text(errors="replace")
    assert values == {n: n + 1 for n in range(TASKS)}
    assert answered == [1] * INSPECT_ROUNDS


def test_undecodable_message_file_is_set_aside_and_the_worker_lives(demo_worker, var_dir):
    """A torn file from some other writer is renamed *.bad and logged, not fatal."""
    queue = var_dir / "broker" / "default" / "queue"
    (queue / "0_torn.celery.msg").write_bytes(b'{"body": "trunc')
    assert demo_worker.app.send_task("demo.tasks.add", (1, 2)).get(timeout=30) == 3
    assert demo_worker.process.poll() is None
    assert [p.name for p in (queue / ".claimed").iterdir()] == ["0_torn.celery.msg.bad"]
    assert "Set aside undecodable message file" in demo_worker.log_path.read_text()
