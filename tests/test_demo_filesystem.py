"""The demo's embedded broker (filesystem://): a real worker runs a task and answers ping."""

from __future__ import annotations

import importlib
import os
from unittest import mock

import pytest

from django_celery_adv.registry import build_app
from tests.workers import WorkerProcess

pytestmark = pytest.mark.workers


@pytest.fixture
def demo_settings(tmp_path):
    with mock.patch.dict(os.environ, {"DEMO_VAR_DIR": str(tmp_path)}):
        os.environ.pop("DEMO_DEFAULT_BROKER", None)
        import demo_project.settings as module

        yield importlib.reload(module)


def test_filesystem_broker_runs_a_task_and_answers_ping(demo_settings, tmp_path):
    app_settings = demo_settings.CELERY_ADV["APPS"]["default"]
    assert app_settings["broker_url"] == "filesystem://"
    app = build_app("default", app_settings)
    worker = WorkerProcess("default", settings_module="demo_project.settings", tag="-fs",
                           app=app, concurrency=1,
                           env={"DEMO_VAR_DIR": str(tmp_path), "DEMO_DEFAULT_BROKER": ""})
    worker.start()
    try:
        replies = app.control.inspect(timeout=5, limit=1).ping()
        assert replies == {worker.name: {"ok": "pong"}}
        assert app.send_task("demo.tasks.add", (20, 22)).get(timeout=30) == 42
    finally:
        worker.stop()
