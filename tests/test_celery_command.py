"""``manage.py celery <alias> ...`` hands the right app to Celery's own CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.workers import ROOT

pytestmark = pytest.mark.workers


def run_manage(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "TEST_USE_TEST_DB": "1"}
    return subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_inspect_ping_reaches_only_that_apps_worker(default_worker, global_worker):
    result = run_manage("celery", "global", "inspect", "ping", "-t", "2")

    assert result.returncode == 0, result.stderr
    assert f"{global_worker.name}: OK" in result.stdout
    assert "1 node online." in result.stdout
    assert default_worker.name not in result.stdout


def test_celery_options_pass_through_untouched():
    result = run_manage("celery", "default", "report")

    assert result.returncode == 0, result.stderr
    assert "broker_url" in result.stdout and "redis://" in result.stdout


def test_unknown_alias_is_a_clear_error_with_exit_code_2():
    result = run_manage("celery", "nosuch", "worker")

    assert result.returncode == 2
    assert "unknown app 'nosuch'" in result.stderr
    assert "default, global, twin" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_alias_prints_usage_with_the_aliases():
    result = run_manage("celery")

    assert result.returncode == 2
    assert "aliases: default, global, twin" in result.stdout
