"""The README's screenshots of the admin pages, made on demand by scripts/screenshots.sh.

Not part of the suite (pytest collects ``test_*.py`` only): run it by path.
It seeds what an operator would see on a live system, through the real code
paths: the three test workers, a lock held by a task running on one of them, a
failure group from tasks that failed on a worker, task history from the
events recorder, and beats (a leader per app,
a standby for ``default``). Then it logs in with the browser of
:mod:`tests.browser` and saves one PNG per page into ``$SCREENSHOTS_DIR``
(default: the build directory). Pages another version may not have yet (the
optional ones) are reported and left out.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.urls import NoReverseMatch, reverse

from django_celery_adv.locks.backends import lock_backends
from django_celery_adv.models import BeatNode, LockDefinition, TaskFailure, TaskRecord
from django_celery_adv.monitoring import forget_workers
from django_celery_adv.registry import apps
from tests.beats import BeatProcess
from tests.browser import chromium, log_in, page_png, serving_admin_static
from tests.faults.servers import wait_until
from tests.test_events import RecorderProcess, events_on
from tests.testapp import event_tasks, failing_tasks, tasks

OUT = Path(os.environ.get("SCREENSHOTS_DIR") or Path(settings.BUILD_DIR) / "screenshots" / "readme")
WIDTH = 1200
#: (file name, admin URL name, whether the page must exist)
PAGES = [
    ("monitoring-workers.png", "django_celery_adv_monitoring_changelist", True),
    ("lock-holders.png", "django_celery_adv_monitoring_locks", True),
    ("lock-definitions.png", "django_celery_adv_lockdefinition_changelist", True),
    ("beat-processes.png", "django_celery_adv_beatnode_changelist", True),
    ("task-failures.png", "django_celery_adv_taskfailure_changelist", True),
    ("tasks.png", "django_celery_adv_taskrecord_changelist", False),
    ("queues.png", "django_celery_adv_monitoring_queues", False),
]

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.workers]


@pytest.fixture
def recorder():
    """The task-events recorder (``manage.py celery_events``) of the tasks page."""
    process = RecorderProcess("default", "global").start()
    yield process
    process.stop()


@pytest.fixture
def beats():
    started = [BeatProcess(alias, f"shot{i}", beat={"TTL": 10, "LOCK_BACKEND": "redis"}).start()
               for i, alias in enumerate(["default", "default", "global", "twin"])]
    yield started
    for beat in started:
        beat.stop(3)


def test_readme_screenshots(live_server, default_worker, global_worker, twin_worker, recorder,
                            beats):
    forget_workers()
    events_on("default")
    events_on("global")
    User.objects.create_superuser("admin", password="admin-pw")
    LockDefinition.objects.create(name="nightly-report", capacity=2)
    LockDefinition.objects.create(name="import-data", capacity=1)
    holding = tasks.locked_sleep.delay("nightly-report", 120)
    for value in ("2026-11-29.csv", "2026-11-30.csv", "missing.csv"):
        failing_tasks.fail_with.delay("value", value)
    failing_tasks.fail_in_stdlib.delay("{not json")
    sent = [event_tasks.rabbit["fail"].delay("2026-12-01").id]
    for app_tasks in (event_tasks.default, event_tasks.rabbit):
        sent += [app_tasks["work"].delay(value, 0.2).id for value in range(3)]
        sent.append(app_tasks["flaky"].delay(7).id)
    tasks.where_default.delay(1).get(timeout=30)
    wait_until(lambda: lock_backends["default"].holders("nightly-report"), 30, "the held lock")
    wait_until(lambda: sum(TaskFailure.objects.values_list("count", flat=True)) == 5, 30,
               "five recorded failures")
    wait_until(lambda: TaskRecord.objects.filter(
        task_id__in=sent, state__in=["SUCCESS", "FAILURE"]).count() == len(sent), 30,
        "the tasks' final states recorded")
    wait_until(lambda: BeatNode.objects.filter(role="leader").count() == 3
               and BeatNode.objects.filter(role="standby").exists(), 60,
               "a beat leader per app and a standby")

    made, missing = [], []
    try:
        # A short window: each picture is as tall as its page's content.
        with serving_admin_static(), chromium(WIDTH, 300) as browser:
            log_in(browser, live_server.url, "admin", "admin-pw")
            pages = list(PAGES)
            group = TaskFailure.objects.order_by("-count").first()
            pages.append(("task-failure.png", "django_celery_adv_taskfailure_change", True,
                          group.pk))
            for name, url_name, required, *args in pages:
                try:
                    url = reverse(f"admin:{url_name}", args=args)
                except NoReverseMatch:
                    assert not required, f"admin page {url_name} is missing"
                    missing.append(name)
                    continue
                browser.get(live_server.url + url)
                assert not any(word in browser.title for word in (
                    "Server Error", "Not Found", "Forbidden", "Log in")), (url, browser.title)
                made.append(page_png(browser, OUT / name))
    finally:
        apps["default"].control.revoke(holding.id, terminate=True)
    print(f"\nscreenshots in {OUT}: {', '.join(p.name for p in made)}"
          + (f"; pages not present here: {', '.join(missing)}" if missing else ""))
    assert all(path.stat().st_size > 10_000 for path in made)
