"""``manage.py celery_status``: output, JSON and exit codes against real workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from django_celery_adv.masking import MASK
from django_celery_adv.monitoring import forget_workers, inspect_all
from tests.test_monitoring import SECRET, with_down_apps
from tests.testapp.monitoring_tasks import monitored_sleep
from tests.workers import ROOT

EXPECTED_QUEUES = {"default": ["celery"], "global": ["global"], "twin": ["twin"]}

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fresh_record():
    forget_workers()
    yield
    forget_workers()


@pytest.fixture
def session_workers(default_worker, global_worker, twin_worker):
    return {"default": default_worker, "global": global_worker, "twin": twin_worker}


def run(*args: str, **options) -> tuple[int, str, str]:
    """call_command, returning (exit code, stdout, stderr) as the CLI would."""
    out, err = StringIO(), StringIO()
    try:
        call_command("celery_status", *args, stdout=out, stderr=err, **options)
        code = 0
    except CommandError as e:
        code = e.returncode
        err.write(str(e))
    return code, out.getvalue(), err.getvalue()


def run_cli(*args: str, settings_module: str = "tests.settings",
            extra_path: str | None = None) -> subprocess.CompletedProcess:
    # The test database: the seen-workers record lives there.
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": settings_module, "TEST_USE_TEST_DB": "1"}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, str(ROOT)]))
    return subprocess.run([sys.executable, str(ROOT / "manage.py"), "celery_status", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_json_lists_exactly_the_running_workers(session_workers):
    code, out, _ = run("--json")

    assert code == 0
    data = json.loads(out)
    assert list(data) == list(settings.CELERY_ADV["APPS"])
    for alias, worker_process in session_workers.items():
        app = data[alias]
        assert app["reachable"] is True and app["error"] is None
        assert [worker["name"] for worker in app["workers"]] == [worker_process.name]
        [worker] = app["workers"]
        assert worker["status"] == "online"
        assert worker["concurrency"] == 2
        assert worker["queues"] == EXPECTED_QUEUES[alias]
        assert worker["running"] is None  # "active" not asked by the table reading
        assert worker["unread"] == [] and app["partial"] is False and app["problem"] is None
    assert ":guest@" not in out  # RabbitMQ's password, masked in the broker URL


def test_default_output_reads_like_inspect_ping_then_a_table(session_workers):
    code, out, _ = run()

    assert code == 0
    lines = out.splitlines()
    for alias, worker_process in session_workers.items():
        header = next(i for i, line in enumerate(lines) if line.startswith(f"{alias}: "))
        assert lines[header + 1] == f"-> {worker_process.name}: OK"  # from stats, no ping
        assert lines[header + 2] == "1 node online."
    table = lines[lines.index(next(line for line in lines if line.startswith("app "))):]
    assert table[0].split() == ["app", "worker", "status", "age", "concurrency", "processed",
                                "running", "queues"]
    rows = {row.split()[1]: row.split() for row in table[1:]}
    assert set(rows) == {worker.name for worker in session_workers.values()}
    for alias, worker_process in session_workers.items():
        assert rows[worker_process.name][0] == alias
        assert rows[worker_process.name][2] == "online"
        assert rows[worker_process.name][3] == "now"
        assert rows[worker_process.name][4] == "2"
        assert rows[worker_process.name][6] == "-"  # running: "active" not asked
        assert rows[worker_process.name][-1] == ",".join(EXPECTED_QUEUES[alias])


def test_active_shows_a_running_task(default_worker):
    result = monitored_sleep.apply_async(args=[3], kwargs={"password": SECRET})
    deadline = time.monotonic() + 15
    out = ""
    while time.monotonic() < deadline and result.id not in out:
        _, out, _ = run("active", "--app", "default", "--fresh")

    assert f"* testapp.monitored_sleep[{result.id}]" in out
    assert SECRET not in out and MASK in out
    row = next(line for line in out.splitlines() if line.startswith("default "))
    assert row.split()[6] == "1"  # running
    result.get(timeout=30)


def test_stats_and_queues(default_worker, global_worker):
    code, out, _ = run("stats", "--app", "global")
    assert code == 0
    assert f"-> {global_worker.name}: OK" in out
    assert "    pool: prefork" in out and "    concurrency: 2" in out
    assert "    processed: " in out and "    processed: ?" not in out
    assert default_worker.name not in out  # --app filters

    code, out, _ = run("queues", "--app", "default", "--app", "global")
    assert code == 0
    assert "    * celery" in out and "    * global" in out


def test_a_down_broker_exits_1_within_the_timeout_without_its_password(session_workers):
    with with_down_apps():
        started = time.monotonic()
        code, out, err = run("--timeout", "1")
        elapsed = time.monotonic() - started
        json_code, json_out, _ = run("--json", "--timeout", "1", "--app", "down_redis")

    assert code == 1 and elapsed <= 2.0
    assert "unhealthy: down_redis (unreachable), down_amqp (unreachable)" in err
    assert "Error: OperationalError" in out and "refused" in out.lower()
    assert f"redis://:{MASK}@127.0.0.1" in out
    assert json_code == 1 and json.loads(json_out)["down_redis"]["reachable"] is False
    for text in (out, err, json_out):
        assert SECRET not in text


def test_an_app_without_workers_exits_1():
    with with_down_apps(idle={"broker_url": settings.REDIS_URL,
                              "task_default_queue": "idle-monitoring"}):
        code, out, err = run("--app", "idle", "--timeout", "0.5")

    assert code == 1
    assert "0 nodes online." in out and "idle (no worker online)" in err


def test_configuration_errors_exit_2():
    code, _, err = run("--app", "nope")
    assert code == 2 and "unknown app 'nope'" in err

    code, _, err = run("--timeout", "0")
    assert code == 2

    broken = {**settings.CELERY_ADV, "APPS": {"other": {"broker_url": settings.REDIS_URL}}}
    with override_settings(CELERY_ADV=broken):
        code, _, err = run(skip_checks=False)
    assert code == 2 and "django_celery_adv.E003" in err


@pytest.mark.django_db(transaction=True)  # the subprocess reads the record
def test_real_process_exit_codes(session_workers, tmp_path):
    """What a container health check sees: the process's own exit status."""
    healthy = run_cli("--timeout", "1")
    assert healthy.returncode == 0, healthy.stderr
    for worker_process in session_workers.values():
        assert f"-> {worker_process.name}: OK" in healthy.stdout

    (tmp_path / "down_settings.py").write_text(
        "from tests.settings import *  # noqa\n"
        "CELERY_ADV = {**CELERY_ADV, 'APPS': {**CELERY_ADV['APPS'], 'down_amqp': "
        f"{{'broker_url': 'amqp://u:{SECRET}@127.0.0.1:1//'}}}}}}\n")
    down = run_cli("--timeout", "1", settings_module="down_settings", extra_path=str(tmp_path))
    assert down.returncode == 1
    assert "down_amqp (unreachable)" in down.stderr
    assert SECRET not in down.stdout + down.stderr

    unknown = run_cli("--app", "nope")
    assert unknown.returncode == 2


def test_inspect_all_and_command_agree(session_workers):
    """The command prints what the library reads (no second source of truth)."""
    statuses = inspect_all()
    _, out, _ = run("--json")
    data = json.loads(out)
    for alias, status in statuses.items():
        assert [w.name for w in status.workers] == [w["name"] for w in data[alias]["workers"]]
