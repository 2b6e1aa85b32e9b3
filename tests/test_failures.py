"""Task-failure analytics: grouping on real workers, masking, the admin, pruning.

Worker tests run ``manage.py celery default worker`` processes on queues of
their own; the worker records into the test database from its own process, so
those tests use ``transaction=True`` and poll for the row (Celery stores the
result before it sends ``task_failure``).
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from django_celery_adv import failures
from django_celery_adv.failures import Occurrence
from django_celery_adv.masking import MASK
from django_celery_adv.models import TaskFailure, TaskFailureDay
from tests.testapp import failing_tasks, tasks
from tests.workers import WorkerProcess

RESULT_TIMEOUT = 30
FAILING_MODULE = "tests/testapp/failing_tasks.py"


# -- worker fixtures ---------------------------------------------------------------

def start_worker(tag: str, **env: str) -> WorkerProcess:
    queue = f"{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    worker = WorkerProcess("default", tag=f"-{tag}", settings_module="tests.logging_settings",
                           env=env, extra_args=("-Q", queue))
    worker.queue = queue
    return worker.start()


@pytest.fixture(scope="module")
def failures_worker(django_db_setup, django_db_blocker) -> Iterator[WorkerProcess]:
    """A worker that records failures into the test database."""
    worker = start_worker("failures")
    yield worker
    worker.stop()


def fail(worker: WorkerProcess, task, *args: Any, **kwargs: Any) -> str:
    """Send ``task`` to ``worker``, wait for it to fail, return its id."""
    result = task.apply_async(args, kwargs, queue=worker.queue)
    with pytest.raises(Exception):  # noqa: B017 (the task's own exception, rebuilt)
        result.get(timeout=RESULT_TIMEOUT, propagate=True)
    assert result.failed()
    return result.id


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not true within {timeout}s: {predicate}")


def group_with_count(count: int, **lookup: Any) -> TaskFailure:
    return wait_for(lambda: TaskFailure.objects.filter(count=count, **lookup).first())


# -- grouping on a real worker -----------------------------------------------------

@pytest.mark.workers
@pytest.mark.django_db(transaction=True)
def test_one_bug_with_five_different_arguments_is_one_group(failures_worker):
    results = [failing_tasks.fail_with.apply_async(("value", f"input-{i}"),
                                                   queue=failures_worker.queue)
               for i in range(5)]  # at once: two processes record concurrently
    for result in results:
        with pytest.raises(ValueError, match="bad value 'input-"):
            result.get(timeout=RESULT_TIMEOUT)

    group = group_with_count(5, task_name="testapp.fail_with")

    assert TaskFailure.objects.count() == 1
    assert group.exception_type == "ValueError"
    assert group.location == f"{FAILING_MODULE}:explode"
    assert group.app_alias == "default"
    assert group.last_hostname == failures_worker.name
    assert group.last_task_id in {result.id for result in results}
    index = [result.id for result in results].index(group.last_task_id)
    assert group.last_message == f"bad value 'input-{index}'"
    assert group.last_args == f"('value', 'input-{index}')"
    assert 'raise ValueError(f"bad value {value!r}")' in group.last_traceback
    assert group.first_seen <= group.last_seen
    assert not group.resolved
    assert list(group.days.values_list("day", "count")) == [(timezone.localdate(), 5)]


@pytest.mark.workers
@pytest.mark.django_db(transaction=True)
def test_another_exception_class_is_another_group(failures_worker):
    fail(failures_worker, failing_tasks.fail_with, "value", "a")
    fail(failures_worker, failing_tasks.fail_with, "key", "b")
    fail(failures_worker, failing_tasks.fail_with, "key", "c")

    key_group = group_with_count(2, exception_type="KeyError")
    value_group = group_with_count(1, exception_type="ValueError")

    assert TaskFailure.objects.count() == 2
    assert key_group.fingerprint != value_group.fingerprint
    assert key_group.location == value_group.location == f"{FAILING_MODULE}:explode"
    assert key_group.last_message == "'c'"


@pytest.mark.workers
@pytest.mark.django_db(transaction=True)
def test_a_failure_inside_the_stdlib_is_located_in_the_task(failures_worker):
    fail(failures_worker, failing_tasks.fail_in_stdlib, "{not json")

    group = group_with_count(1, task_name="testapp.fail_in_stdlib")

    assert group.exception_type == "json.decoder.JSONDecodeError"
    assert group.location == f"{FAILING_MODULE}:fail_in_stdlib"
    assert "json/decoder.py" in group.last_traceback  # the stdlib frames are still shown


@pytest.mark.workers
@pytest.mark.django_db(transaction=True)
def test_a_resolved_group_reopens_on_the_next_failure(failures_worker, admin_client):
    fail(failures_worker, failing_tasks.fail_with, "value", 1)
    group = group_with_count(1)
    admin_client.post(reverse("admin:django_celery_adv_taskfailure_changelist"),
                      {"action": "mark_resolved", "_selected_action": [group.pk]})
    group.refresh_from_db()
    assert group.resolved
    assert group.resolved_at is not None

    second = fail(failures_worker, failing_tasks.fail_with, "value", 2)

    group = group_with_count(2)
    assert not group.resolved
    assert group.resolved_at is None
    assert group.last_task_id == second


@pytest.mark.workers
@pytest.mark.django_db(transaction=True)
def test_retries_that_exhaust_are_one_failure(failures_worker):
    result = failing_tasks.retry_until_exhausted.apply_async(("feed",),
                                                             queue=failures_worker.queue)
    with pytest.raises(ConnectionError, match="upstream down for feed"):
        result.get(timeout=RESULT_TIMEOUT)

    group = group_with_count(1, task_name="testapp.retry_until_exhausted")

    time.sleep(0.5)  # a retry recorded late would show up now
    group.refresh_from_db()
    assert group.count == 1  # the two retries before it are not failures
    assert group.exception_type == "ConnectionError"
    assert group.last_task_id == result.id


@pytest.mark.workers
@pytest.mark.django_db(transaction=True)
def test_secret_looking_arguments_are_masked_in_the_record(failures_worker):
    fail(failures_worker, failing_tasks.fail_with, "value",
         "postgres://app:s3cr3t-pw@db.internal/app",
         password="hunter2", api_key="AKIA-123", headers={"Authorization": "Bearer abc"},
         note="visible")

    group = group_with_count(1)

    stored = group.last_args + group.last_kwargs + group.last_message + group.last_traceback
    for secret in ("s3cr3t-pw", "hunter2", "AKIA-123", "Bearer abc"):
        assert secret not in stored
    assert group.last_args == f"('value', 'postgres://app:{MASK}@db.internal/app')"
    assert f"'password': '{MASK}'" in group.last_kwargs
    assert f"'api_key': '{MASK}'" in group.last_kwargs
    assert f"'headers': {{'Authorization': '{MASK}'}}" in group.last_kwargs
    assert "'note': 'visible'" in group.last_kwargs


@pytest.mark.workers
@pytest.mark.django_db(transaction=True)
def test_database_down_while_recording_leaves_the_worker_alive():
    worker = start_worker("nodb", TEST_FAILURE_DB="down")
    try:
        failed = failing_tasks.fail_with.apply_async(("value", "x"), queue=worker.queue)
        with pytest.raises(ValueError, match="bad value 'x'"):  # the task's own error
            failed.get(timeout=RESULT_TIMEOUT)

        log = wait_for(lambda: "could not record the failure" in worker.log_path.read_text()
                       and worker.log_path.read_text())
        assert f"could not record the failure of testapp.fail_with[{failed.id}] " \
               "(OperationalError:" in log
        assert "; dropped" in log
        assert worker.name in worker.ping(timeout=5)
        after = tasks.where_default.apply_async(("next",), queue=worker.queue)
        assert after.get(timeout=RESULT_TIMEOUT)["value"] == "next"
        assert worker.process.poll() is None
    finally:
        worker.stop()
    assert not TaskFailure.objects.exists()  # dropped, not written anywhere


# -- recording in-process -------------------------------------------------------------

def raise_in_project_code(value: Any) -> None:
    json.loads(value)  # raises inside the stdlib


def captured(exc_type: type[BaseException], func: Callable[..., Any], *args: Any):
    try:
        func(*args)
    except exc_type as e:
        return e
    raise AssertionError("did not raise")


def test_fingerprint_skips_stdlib_and_site_packages_frames():
    from django.utils.module_loading import import_string

    in_stdlib = captured(ValueError, raise_in_project_code, "{")
    in_django = captured(ImportError, import_string, "nodots")
    relative = "tests/test_failures.py"

    assert failures.innermost_project_frame(in_stdlib.__traceback__) == \
        f"{relative}:raise_in_project_code"
    assert failures.innermost_project_frame(in_django.__traceback__) == f"{relative}:captured"
    same_bug = captured(ValueError, raise_in_project_code, "[")
    assert Occurrence.from_exception(task_name="t", exception=in_stdlib).fingerprint == \
        Occurrence.from_exception(task_name="t", exception=same_bug).fingerprint
    assert Occurrence.from_exception(task_name="t", exception=in_stdlib).fingerprint != \
        Occurrence.from_exception(task_name="other", exception=same_bug).fingerprint


@pytest.mark.parametrize(("value", "expected"), [
    ({"user": "bob", "password": "x"}, f"{{'password': '{MASK}', 'user': 'bob'}}"),
    ({"DB_PASSWD": 1, "x-api-key": "k", "refresh_token": "t"},
     f"{{'DB_PASSWD': '{MASK}', 'refresh_token': '{MASK}', 'x-api-key': '{MASK}'}}"),
    (("amqp://guest:guest@rabbit//", "https://example.com/a:b@c"),
     f"('amqp://guest:{MASK}@rabbit//', 'https://example.com/a:b@c')"),
    (["login password=hunter2 ok"], f"['login password={MASK} ok']"),
    ({"nested": {"deeper": ({"Authorization": "Basic x"},)}},
     f"{{'nested': {{'deeper': ({{'Authorization': '{MASK}'}},)}}}}"),
    ((42, None), "(42, None)"),
])
def test_stored_arguments_are_masked(value, expected):
    assert failures.shorten(value) == expected


def test_an_objects_repr_is_masked_too():
    class Connection:
        def __repr__(self) -> str:
            return "<Connection redis://:hunter2@cache:6379/0>"

    assert failures.shorten((Connection(),)) == f"(<Connection redis://:{MASK}@cache:6379/0>,)"


def test_shorten_bounds_long_arguments():
    text = failures.shorten(("x" * 10_000, list(range(1000))))
    assert len(text) < 600
    assert "..." in text


@pytest.mark.django_db
def test_record_failures_false_records_nothing():
    error = captured(ValueError, raise_in_project_code, "{")
    with override_settings(CELERY_ADV={"APPS": {"default": {"broker_url": "memory://"}},
                                       "RECORD_FAILURES": False}):
        failures.on_task_failure(sender=failing_tasks.fail_with, task_id="t-1",
                                 exception=error, args=(), kwargs={})
    assert not TaskFailure.objects.exists()

    failures.on_task_failure(sender=failing_tasks.fail_with, task_id="t-2", exception=error,
                             args=("{",), kwargs={})
    group = TaskFailure.objects.get()
    assert (group.count, group.last_task_id, group.app_alias) == (1, "t-2", "default")


@pytest.mark.django_db
def test_a_recording_error_is_logged_and_dropped(monkeypatch, caplog):
    def broken_record(occurrence, using=None):
        raise RuntimeError("recorder bug")

    monkeypatch.setattr(failures, "record", broken_record)
    error = captured(ValueError, raise_in_project_code, "{")

    failures.on_task_failure(sender=failing_tasks.fail_with, task_id="t-3", exception=error)

    assert "could not record the failure of testapp.fail_with[t-3]; dropped" in caplog.text
    assert "RuntimeError: recorder bug" in caplog.text


# -- admin -------------------------------------------------------------------------------

def make_group(task_name: str = "billing.charge", exception: str = "ValueError",
               alias: str = "default", counts: dict[int, int] | None = None,
               message: str = "card declined", **fields: Any) -> TaskFailure:
    """A group whose per-day rows are ``{days ago: count}``."""
    counts = counts if counts is not None else {0: 1}
    now = timezone.now()
    oldest = max(counts) if counts else 0
    group = TaskFailure.objects.create(
        fingerprint=failures.fingerprint(task_name, exception, "app/x.py:f"),
        task_name=task_name, exception_type=exception, location="app/x.py:f",
        app_alias=alias, count=sum(counts.values()),
        first_seen=now - datetime.timedelta(days=oldest),
        last_seen=fields.pop("last_seen", now - datetime.timedelta(days=min(counts or [0]))),
        last_message=message, last_traceback="Traceback (most recent call last):\n  boom <x>",
        last_task_id=uuid.uuid4().hex, **fields)
    for ago, count in counts.items():
        TaskFailureDay.objects.create(failure=group, count=count,
                                      day=timezone.localdate(now) - datetime.timedelta(ago))
    return group


CHANGELIST = "admin:django_celery_adv_taskfailure_changelist"


@pytest.mark.django_db
def test_admin_list_sorted_by_last_seen_with_counts(admin_client):
    old = make_group("reports.build", counts={3: 2})
    new = make_group("billing.charge", counts={0: 7})

    page = admin_client.get(reverse(CHANGELIST))

    assert page.status_code == 200
    assert list(page.context["cl"].result_list) == [new, old]
    html = page.content.decode()
    assert html.index("billing.charge") < html.index("reports.build")
    assert '<td class="field-count">7</td>' in html
    assert "card declined" in html


@pytest.mark.django_db
def test_admin_filters_and_search(admin_client):
    make_group("billing.charge", "ValueError", alias="default")
    make_group("billing.refund", "KeyError", alias="global", message="no such order 42")
    url = reverse(CHANGELIST)

    def tasks_listed(**params: str) -> set[str]:
        page = admin_client.get(url, params)
        assert page.status_code == 200
        return {group.task_name for group in page.context["cl"].result_list}

    assert tasks_listed(app_alias="global") == {"billing.refund"}
    assert tasks_listed(exception_type="ValueError") == {"billing.charge"}
    assert tasks_listed(task_name="billing.refund") == {"billing.refund"}
    assert tasks_listed(q="order 42") == {"billing.refund"}
    assert tasks_listed(resolved__exact="0") == {"billing.charge", "billing.refund"}


@pytest.mark.django_db
def test_admin_detail_shows_traceback_and_a_30_day_chart(admin_client):
    group = make_group(counts={0: 4, 1: 1, 10: 8, 45: 3})

    page = admin_client.get(reverse("admin:django_celery_adv_taskfailure_change",
                                    args=[group.pk]))

    assert page.status_code == 200
    html = page.content.decode()
    assert "Traceback (most recent call last):\n  boom &lt;x&gt;" in html  # escaped, verbatim
    bars = [dict(re.findall(r'([\w-]+)="([^"]*)"', attrs))
            for attrs in re.findall(r'<rect class="bar"([^>]*)>', html)]
    assert len(bars) == 30
    by_day = {bar["data-day"]: bar for bar in bars}
    today = timezone.localdate()
    assert bars[-1]["data-day"] == today.isoformat()
    for ago, count, height in [(0, 4, 50), (1, 1, 12), (10, 8, 100), (2, 0, 0)]:
        day = (today - datetime.timedelta(days=ago)).isoformat()
        assert (by_day[day]["data-count"], by_day[day]["height"]) == (str(count), str(height))
        assert int(by_day[day]["y"]) + height == 100  # bars stand on one baseline
        assert f"<title>{day}: {count}</title>" in html
    # 45 days ago is outside the chart, and the caption sums the 30 days shown.
    assert (today - datetime.timedelta(days=45)).isoformat() not in html
    assert "13 failures in the last 30 days; busiest day: 8." in html
    chart = html[html.index('<figure class="dca-failure-chart"'):html.index("</figure>")]
    assert "<svg" in chart
    assert "<script" not in chart


@pytest.mark.django_db
def test_admin_actions_mark_resolved_and_delete(admin_client):
    first, second, third = make_group("a.t"), make_group("b.t"), make_group("c.t")
    url = reverse(CHANGELIST)

    page = admin_client.post(url, {"action": "mark_resolved",
                                   "_selected_action": [first.pk, second.pk]}, follow=True)

    assert "Marked 2 failure group(s) resolved." in page.content.decode()
    assert set(TaskFailure.objects.filter(resolved=True).values_list("task_name", flat=True)) \
        == {"a.t", "b.t"}

    admin_client.post(url, {"action": "delete_selected", "_selected_action": [first.pk],
                            "post": "yes"})

    assert set(TaskFailure.objects.values_list("task_name", flat=True)) == {"b.t", "c.t"}
    assert not TaskFailureDay.objects.filter(failure_id=first.pk).exists()
    assert third.pk in set(TaskFailure.objects.values_list("pk", flat=True))


@pytest.mark.django_db
def test_admin_detail_resolves_and_reopens_by_hand(admin_client):
    group = make_group()
    url = reverse("admin:django_celery_adv_taskfailure_change", args=[group.pk])

    admin_client.post(url, {"resolved": "on"})
    group.refresh_from_db()
    assert group.resolved
    assert group.resolved_at is not None
    assert group.count == 1  # the read-only fields are untouched

    admin_client.post(url, {})
    group.refresh_from_db()
    assert not group.resolved
    assert group.resolved_at is None


@pytest.mark.django_db
def test_admin_has_no_add_page_and_resolving_needs_change_permission(client):
    group = make_group()
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_taskfailure"))
    client.force_login(viewer)

    assert client.get(reverse("admin:django_celery_adv_taskfailure_add")).status_code == 403
    listing = client.get(reverse(CHANGELIST))
    assert listing.status_code == 200
    assert "mark_resolved" not in listing.content.decode()
    client.post(reverse(CHANGELIST), {"action": "mark_resolved",
                                      "_selected_action": [group.pk]})
    group.refresh_from_db()
    assert not group.resolved


# -- retention -----------------------------------------------------------------------------

@pytest.mark.django_db
def test_prune_command_deletes_old_days_and_groups_not_seen_since():
    gone = make_group("old.task", counts={100: 3})
    kept = make_group("busy.task", counts={0: 2, 95: 4})

    call_command("prune_task_failures", "--dry-run", stdout=(out := io.StringIO()))
    assert "Would delete 1 failure group(s) and 2 per-day count(s) older than 90 day(s)." \
        in out.getvalue()
    assert TaskFailure.objects.count() == 2

    call_command("prune_task_failures", stdout=(out := io.StringIO()))

    assert "Deleted 1 failure group(s) and 2 per-day count(s) older than 90 day(s)." \
        in out.getvalue()
    assert list(TaskFailure.objects.values_list("pk", flat=True)) == [kept.pk]
    assert not TaskFailure.objects.filter(pk=gone.pk).exists()
    assert list(kept.days.values_list("count", flat=True)) == [2]
    kept.refresh_from_db()
    assert kept.count == 6  # the lifetime count stays


@pytest.mark.django_db
def test_prune_uses_the_setting_and_the_days_option():
    make_group("a.task", counts={10: 1})
    with override_settings(CELERY_ADV={"APPS": {"default": {"broker_url": "memory://"}},
                                       "FAILURE_RETENTION_DAYS": 30}):
        call_command("prune_task_failures", stdout=(out := io.StringIO()))
        assert "Deleted 0 failure group(s)" in out.getvalue()
        call_command("prune_task_failures", "--days", "7", stdout=(out := io.StringIO()))
        assert "Deleted 1 failure group(s) and 1 per-day count(s) older than 7 day(s)." \
            in out.getvalue()
    with pytest.raises(CommandError, match="retention must be a number of days >= 1"):
        call_command("prune_task_failures", "--days", "0")


def test_daily_counts_fill_the_days_without_failures():
    today = datetime.date(2026, 3, 10)

    class Days:
        def filter(self, **lookup):
            assert lookup == {"day__gte": datetime.date(2026, 3, 8), "day__lte": today}
            return self

        def values_list(self, *fields):
            return [(datetime.date(2026, 3, 9), 4)]

    class Group:
        days = Days()

    assert failures.daily_counts(Group(), 3, today=today) == [
        (datetime.date(2026, 3, 8), 0), (datetime.date(2026, 3, 9), 4), (today, 0)]

