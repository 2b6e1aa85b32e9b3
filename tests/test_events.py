"""Task history from events: recorder (real workers, Redis and RabbitMQ apps), merge,
retention, the admin Tasks page (permissions, admin log, query count, dead servers)."""

from __future__ import annotations

import datetime
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.db import connection
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_celery_adv import monitoring
from django_celery_adv.events import merge, store, worker_counters
from django_celery_adv.events.recorder import AppRecorder
from django_celery_adv.models import TaskFailure, TaskRecord, TaskRecorderStats
from django_celery_adv.registry import apps
from tests.testapp import event_tasks
from tests.workers import LOG_DIR, ROOT, _die_with_parent

TASKS = {"default": event_tasks.default, "global": event_tasks.rabbit}


class RecorderProcess:
    """``manage.py celery_events`` in a subprocess on the test database."""

    def __init__(self, *aliases: str, tag: str = "") -> None:
        self.aliases = aliases
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"recorder-{'-'.join(aliases)}{tag}-{os.getpid()}.log"
        self.log_path.write_text("")
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> RecorderProcess:
        command = [sys.executable, str(ROOT / "manage.py"), "celery_events"]
        for alias in self.aliases:
            command += ["--app", alias]
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
               "TEST_USE_TEST_DB": "1", "PYTHONUNBUFFERED": "1"}
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_die_with_parent)
        log.close()
        wait_for(lambda: self.log().count("consuming events from") >= len(self.aliases),
                 timeout, lambda: f"recorder not consuming:\n{self.log()}")
        return self

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
            raise


def wait_for(condition, timeout: float, message=lambda: "timed out") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(message())


def events_on(alias: str, timeout: float = 30.0) -> None:
    """Wait until a probe task of ``alias`` is recorded as succeeded (the recorder
    turned task events on at the worker, which started without -E)."""
    probes: list[str] = []

    def recorded() -> bool:
        if TaskRecord.objects.filter(app_alias=alias, task_id__in=probes,
                                     state="SUCCESS").exists():
            return True
        probes.append(TASKS[alias]["work"].delay(0).id)
        return False

    wait_for(recorded, timeout, lambda: f"no probe task of {alias} recorded")


@pytest.fixture
def recorder_factory():
    started: list[RecorderProcess] = []

    def start(*aliases: str, tag: str = "") -> RecorderProcess:
        recorder = RecorderProcess(*aliases, tag=tag).start()
        started.append(recorder)
        return recorder

    yield start
    for recorder in started:
        recorder.stop()


# -- merge (no servers) --------------------------------------------------------------

def _events(task_id: str, t0: float = 1000.0) -> list[dict]:
    return [
        {"type": "task-received", "uuid": task_id, "name": "t.x", "args": "(1, 'a')",
         "kwargs": "{'password': 'hunter2'}", "hostname": "w1", "timestamp": t0,
         "root_id": task_id, "parent_id": None, "retries": 0},
        {"type": "task-started", "uuid": task_id, "hostname": "w1", "timestamp": t0 + 1},
        {"type": "task-succeeded", "uuid": task_id, "hostname": "w1", "timestamp": t0 + 3,
         "result": "42", "runtime": 2.0},
    ]


def test_merge_any_order_gives_the_final_state():
    outcomes = set()
    for order in itertools.permutations(_events("a")):
        change: dict = {}
        for event in order:
            merge.apply_event(change, event)
        merge.derive(change)
        outcomes.add((change["state"], change["name"], change["received_at"],
                      change["started_at"], change["succeeded_at"], change["runtime"],
                      change["queue_wait"], change["result"]))
    assert outcomes == {("SUCCESS", "t.x", 1000.0, 1001.0, 1003.0, 2.0, 1.0, "42")}


def test_merge_masks_arguments_and_retry_needs_exact_ones():
    change = merge.apply_event({}, _events("a")[0])
    assert "hunter2" not in change["kwargs"] and change["retryable"] is False
    clean = merge.apply_event({}, {**_events("b")[0], "kwargs": "{'x': 1}"})
    assert clean["retryable"] is True and clean["args"] == "(1, 'a')"


@pytest.mark.django_db(transaction=True)
def test_late_started_in_a_later_batch_does_not_overwrite_succeeded():
    received, started, succeeded = _events("late-1")
    store.write_batch("default", {"late-1": merge.apply_event(merge.apply_event({}, received),
                                                              succeeded)})
    store.write_batch("default", {"late-1": merge.apply_event({}, started)})
    record = TaskRecord.objects.get(task_id="late-1")
    assert record.state == "SUCCESS"
    assert record.started_at.timestamp() == 1001.0 and record.queue_wait == 1.0
    assert record.runtime == 2.0 and record.name == "t.x"


# -- recorder with real workers -----------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_200_tasks_of_mixed_outcomes_on_redis_and_rabbitmq(default_worker, global_worker,
                                                           recorder_factory):
    recorder_factory("default", "global")
    workers = {"default": default_worker, "global": global_worker}
    expected: dict[str, tuple[str, str, dict]] = {}
    for alias in workers:
        events_on(alias)
        tasks = TASKS[alias]
        for i in range(70):
            seconds = 0.02 if i < 10 else 0.0
            expected[tasks["work"].delay(i, seconds).id] = (alias, "SUCCESS",
                                                            {"result": str(i * 2),
                                                             "min_runtime": seconds})
        for i in range(20):
            expected[tasks["fail"].delay(i).id] = (alias, "FAILURE", {"value": i})
        for i in range(10):
            expected[tasks["flaky"].delay(i).id] = (alias, "SUCCESS", {"retries": 1})
    assert len(expected) == 200

    def all_final() -> bool:
        return TaskRecord.objects.filter(task_id__in=expected,
                                         state__in=["SUCCESS", "FAILURE"]).count() == 200

    wait_for(all_final, 45, lambda: str(TaskRecord.objects.filter(task_id__in=expected)
                                        .values_list("state", flat=True)))
    # Retries of flaky tasks and the workers' counters may come one batch later.
    flaky = [task_id for task_id, (_, _, extra) in expected.items() if "retries" in extra]

    def counted(alias: str, name: str) -> tuple[int, int] | None:
        counters = worker_counters(alias).get(name)
        return None if counters is None else (counters.failed, counters.retried)

    def retries_and_counters_in() -> bool:
        return TaskRecord.objects.filter(task_id__in=flaky, retries=1).count() == len(flaky) \
            and all(counted(alias, worker.name) == (20, 10) for alias, worker in workers.items())

    wait_for(retries_and_counters_in, 15, lambda: "retries or counters not recorded")
    records = {r.task_id: r for r in TaskRecord.objects.filter(task_id__in=expected)}
    for task_id, (alias, state, extra) in expected.items():
        record = records[task_id]
        assert (record.app_alias, record.state) == (alias, state), record
        assert record.worker == workers[alias].name
        assert record.runtime is not None and 0 <= record.runtime < 5, record
        assert record.received_at and record.started_at and record.queue_wait is not None
        if "result" in extra:
            assert record.result == extra["result"]
            assert record.runtime >= extra["min_runtime"]
            assert record.succeeded_at >= record.started_at
        if "value" in extra:
            assert f"bad value {extra['value']}" in record.exception
            assert "ValueError" in record.traceback and record.failed_at
        if "retries" in extra:
            assert record.retries == 1
    for alias, worker in workers.items():
        counters = worker_counters(alias)[worker.name]
        assert (counters.failed, counters.retried) == (20, 10)
        assert counters.succeeded >= 80 and counters.loadavg and counters.heartbeat_at
        stats = TaskRecorderStats.objects.get(app_alias=alias)
        assert stats.events_dropped == 0 and stats.events_written >= 300
        # Heartbeats reached the fleet's seen-workers record (monitoring.mark_seen_many).
        assert worker.name in monitoring.load_seen(alias)
        assert stats.task_counts[f"events.{alias}.fail"]["FAILURE"] == 20


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("alias", ["global", "default"])
def test_recorder_restarted_mid_stream_keeps_every_final_state_delivered(
        alias, default_worker, global_worker, recorder_factory):
    """RabbitMQ keeps the recorder's event queue while it restarts: nothing is lost.
    Redis fan-out keeps nothing: every task that ends after the restart is final."""
    first = recorder_factory(alias, tag="-first")
    events_on(alias)
    # Each result is waited on through the app that sent it (the rpc:// backend of
    # "global" replies to the sending app's own queue).
    results = [TASKS[alias]["work"].delay(i, 0.15) for i in range(40)]
    ids = [result.id for result in results]
    wait_for(lambda: TaskRecord.objects.filter(task_id__in=ids).exists(), 10)
    assert first.stop() == 0
    assert "writing the last batch" in first.log()
    before = dict(TaskRecord.objects.filter(task_id__in=ids).values_list("task_id", "state"))
    assert before
    recorder_factory(alias, tag="-second")
    ready = time.time()
    # The stream goes on across the restart, however long the restart took.
    results += [TASKS[alias]["work"].delay(i, 0.05) for i in range(40, 60)]
    ids = [result.id for result in results]
    for result in results:
        assert result.get(timeout=30) is not None
    if alias == "global":
        must_be_final = set(ids)
    else:
        must_be_final = {r.id for r in results
                         if r.date_done and r.date_done.timestamp() > ready + 0.2}
        assert must_be_final, "every task ended before the restart: test too slow to tell"
    wait_for(lambda: TaskRecord.objects.filter(task_id__in=must_be_final,
                                               state="SUCCESS").count() == len(must_be_final),
             20, lambda: "final states lost after the restart")
    after = dict(TaskRecord.objects.filter(task_id__in=ids).values_list("task_id", "state"))
    for task_id, state in before.items():  # nothing went backwards
        assert not (state == "SUCCESS" and after[task_id] != "SUCCESS")


def test_recorder_on_a_dead_broker_reports_and_stops_cleanly():
    dead = {**settings.CELERY_ADV,
            "APPS": {**settings.CELERY_ADV["APPS"],
                     "dead": {"broker_url": "redis://127.0.0.1:1/0"}}}
    with override_settings(CELERY_ADV=dead):
        recorder = AppRecorder("dead", {**store_settings(), "ENABLE_EVENTS_INTERVAL": 0}).start()
        try:
            wait_for(lambda: recorder.broker_error, 10)
            assert "Connection refused" in recorder.broker_error or "Error" in recorder.broker_error
        finally:
            recorder.stop()
            started = time.monotonic()
            recorder.join(10)
        assert time.monotonic() - started < 5
        assert not any(thread.is_alive() for thread in recorder._threads)


def store_settings() -> dict:
    from django_celery_adv.events import settings_for

    return settings_for("default")


@pytest.mark.django_db(transaction=True)
def test_dead_database_keeps_the_batch_and_writes_it_later():
    recorder = AppRecorder("default", store_settings(), enable_events=False)
    for event in _events("db-1"):
        recorder.on_event(event)
    table = TaskRecord._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} RENAME TO {table}_away")
    try:
        assert recorder.flush() == 0
        assert "taskrecord" in recorder.db_error.lower()
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {table}_away RENAME TO {table}")
    assert recorder.flush() == 3
    assert TaskRecord.objects.get(task_id="db-1").state == "SUCCESS"
    assert TaskRecorderStats.objects.get(app_alias="default").events_dropped == 0


def test_full_buffer_drops_with_a_counter():
    recorder = AppRecorder("default", {**store_settings(), "MAX_PENDING": 5},
                           enable_events=False)
    for i in range(8):
        recorder.on_event({"type": "task-received", "uuid": f"t{i}", "timestamp": 1.0})
    recorder.on_event({"type": "task-started", "uuid": "t0", "timestamp": 2.0})
    pending, _, _, seen, dropped, _ = recorder.take()
    assert (len(pending), seen, dropped) == (5, 9, 3)
    assert pending["t0"]["state"] == "STARTED"


# -- retention -----------------------------------------------------------------------

def _records(alias: str, count: int, *, age_days: float = 0, prefix: str = "") -> None:
    when = timezone.now() - datetime.timedelta(days=age_days)
    TaskRecord.objects.bulk_create(TaskRecord(
        app_alias=alias, task_id=f"{prefix}{uuid.uuid4()}", name="events.default.work",
        state="SUCCESS", updated_at=when, args=f"({i},)", retryable=True,
        worker="w@host") for i in range(count))


@pytest.mark.django_db
def test_prune_by_age_and_by_count_per_app(capsys):
    _records("default", 10, age_days=10)
    _records("default", 20)
    _records("global", 7, age_days=10)
    newest = list(TaskRecord.objects.filter(app_alias="default").order_by("-id")
                  .values_list("id", flat=True)[:5])
    call_command("prune_tasks", "--app", "default", "--days", "7")
    assert "default: deleted 10 record(s) by age, 0 by count" in capsys.readouterr().out
    assert TaskRecord.objects.filter(app_alias="default").count() == 20
    assert TaskRecord.objects.filter(app_alias="global").count() == 7
    with override_settings(CELERY_ADV={**settings.CELERY_ADV, "EVENTS": {
            "RETENTION_DAYS": None, "APPS": {"default": {"RETENTION_COUNT": 5}}}}):
        call_command("celery_events", "--prune")
    out = capsys.readouterr().out
    assert "default: deleted 0 record(s) by age, 15 by count" in out
    assert sorted(TaskRecord.objects.filter(app_alias="default")
                  .values_list("id", flat=True), reverse=True) == newest
    assert TaskRecord.objects.filter(app_alias="global").count() == 7  # 100 000 kept


# -- admin ---------------------------------------------------------------------------

CHANGELIST = "admin:django_celery_adv_taskrecord_changelist"


def _client(user: User | None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def _staff(*codenames: str) -> User:
    user = User.objects.create_user(f"staff-{uuid.uuid4().hex[:8]}", password="x",
                                    is_staff=True)
    perms = Permission.objects.filter(content_type__app_label="django_celery_adv",
                                      codename__in=["view_taskrecord", *codenames])
    user.user_permissions.add(*perms)
    return User.objects.get(pk=user.pk)


@pytest.mark.django_db
def test_changelist_query_count_is_the_same_for_10_and_200_records():
    _records("default", 10)
    client = _client(_staff())
    url = reverse(CHANGELIST) + "?state__exact=SUCCESS&o=5"

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            response = client.get(url)
        assert response.status_code == 200
        return len(captured)

    few = queries()
    _records("default", 190)
    many = queries()
    assert few == many
    page = client.get(reverse(CHANGELIST)).content.decode()
    assert "More than 200" not in page and "200 tasks" in page
    _records("default", 400)  # beyond 11 pages of 50: counted no further
    assert "More than 550 tasks match" in client.get(reverse(CHANGELIST)).content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize("action", ["retry", "revoke", "terminate"])
def test_action_needs_its_permission_and_is_logged(action, default_worker):
    _records("default", 1)
    record = TaskRecord.objects.get()
    record.args, record.name = "(21,)", "events.default.work"
    record.save()
    url = reverse(f"admin:django_celery_adv_taskrecord_{action}", args=[record.pk])
    assert _client(None).post(url).status_code == 302  # to the login page
    others = [c for c in ("retry", "revoke", "terminate") if c != action]
    denied = _client(_staff(*[f"{c}_taskrecord" for c in others]))
    assert denied.post(url).status_code == 403
    assert not LogEntry.objects.exists()
    allowed = _client(_staff(f"{action}_taskrecord"))
    response = allowed.post(url, follow=True)
    assert response.status_code == 200
    entry = LogEntry.objects.get()
    assert entry.object_id == str(record.pk) and record.task_id in entry.get_change_message()
    if action == "retry":
        new_id = entry.get_change_message().rsplit(" ", 1)[1].rstrip(".")
        assert apps["default"].AsyncResult(new_id).get(timeout=15) == 42


@pytest.mark.django_db(transaction=True)  # PostgreSQL: a failed query ends a transaction
def test_dead_broker_gives_a_message_and_dead_database_a_readable_page():
    dead = {**settings.CELERY_ADV,
            "APPS": {**settings.CELERY_ADV["APPS"],
                     "dead": {"broker_url": "redis://:s3cret@127.0.0.1:1/0"}}}
    TaskRecord.objects.create(app_alias="dead", task_id="d-1", name="x.y", state="FAILURE",
                              args="(1,)", retryable=True, updated_at=timezone.now())
    record = TaskRecord.objects.get()
    admin_user = User.objects.create_superuser("root", password="x")
    client = _client(admin_user)
    with override_settings(CELERY_ADV=dead):
        started = time.monotonic()
        response = client.post(reverse("admin:django_celery_adv_taskrecord_retry",
                                       args=[record.pk]), follow=True)
    assert time.monotonic() - started < 10
    page = response.content.decode()
    assert response.status_code == 200 and "unavailable" in page and "s3cret" not in page
    assert not LogEntry.objects.exists()
    table = TaskRecord._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} RENAME TO {table}_away")
    try:
        response = client.get(reverse(CHANGELIST))
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {table}_away RENAME TO {table}")
    assert response.status_code == 503
    assert "database is unavailable" in response.content.decode()


@pytest.mark.django_db
def test_detail_links_parent_children_and_failure_group():
    now = timezone.now()
    parent = TaskRecord.objects.create(app_alias="default", task_id="p-1", name="a.parent",
                                       state="SUCCESS", updated_at=now, root_id="p-1")
    child = TaskRecord.objects.create(app_alias="default", task_id="c-1", name="a.child",
                                      state="FAILURE", updated_at=now, parent_id="p-1",
                                      root_id="p-1", exception="ValueError('x')")
    group = TaskFailure.objects.create(fingerprint="f" * 64, task_name="a.child",
                                       exception_type="ValueError", first_seen=now,
                                       last_seen=now, count=3)
    client = _client(User.objects.create_superuser("root", password="x"))
    page = client.get(reverse("admin:django_celery_adv_taskrecord_change",
                              args=[child.pk])).content.decode()
    assert reverse("admin:django_celery_adv_taskrecord_change", args=[parent.pk]) in page
    assert reverse("admin:django_celery_adv_taskfailure_change", args=[group.pk]) in page
    page = client.get(reverse("admin:django_celery_adv_taskrecord_change",
                              args=[parent.pk])).content.decode()
    assert reverse("admin:django_celery_adv_taskrecord_change", args=[child.pk]) in page
    failure_page = client.get(reverse("admin:django_celery_adv_taskfailure_change",
                                      args=[group.pk])).content.decode()
    assert reverse(CHANGELIST) + "?name=a.child" in failure_page.replace("&amp;", "&")


def test_events_settings_checks():
    from django_celery_adv.checks import check_events_settings

    def ids(events) -> list[str]:
        with override_settings(CELERY_ADV={**settings.CELERY_ADV, "EVENTS": events}):
            return sorted(m.id.rpartition(".")[2] for m in check_events_settings())

    assert ids({"RETENTION_DAYS": None, "APPS": {"global": {"RETENTION_COUNT": 10}}}) == []
    assert ids([]) == ["E026"]
    assert ids({"RETENTION": 3}) == ["E026"]
    assert ids({"APPS": {"nope": {}}}) == ["E026"]
    assert ids({"APPS": {"default": {"MAX_PENDING": 5}}, "QUEUE_EXPIRES": -1}) == \
        ["E027", "E027"]


@pytest.mark.django_db(transaction=True)
def test_recorder_reconnects_after_a_broker_restart():
    from tests.faults.servers import RedisServer

    server = RedisServer().start()
    own = {**settings.CELERY_ADV, "APPS": {**settings.CELERY_ADV["APPS"],
                                           "own": {"broker_url": server.url}}}
    try:
        with override_settings(CELERY_ADV=own):
            app = apps["own"]
            recorder = AppRecorder("own", {**store_settings(), "ENABLE_EVENTS_INTERVAL": 0}).start()

            def recorded(task_id: str) -> bool:
                with app.connection_for_write() as conn:
                    app.events.Dispatcher(conn, hostname="w@fake", enabled=True).send(
                        "task-succeeded", uuid=task_id, result="1", runtime=0.5)
                return TaskRecord.objects.filter(task_id=task_id, state="SUCCESS").exists()

            try:
                wait_for(recorder.connected.is_set, 10)
                wait_for(lambda: recorded("before-restart"), 10)
                server.restart()
                wait_for(lambda: recorded("after-restart"), 20,
                         lambda: f"not recorded after the restart: {recorder.broker_error}")
            finally:
                recorder.stop()
                recorder.join(10)
    finally:
        server.remove()


@pytest.mark.django_db
def test_changelist_action_needs_its_permission_and_is_logged():
    _records("default", 2)
    ids = [str(pk) for pk in TaskRecord.objects.values_list("pk", flat=True)]
    form = {"action": "revoke_tasks", "_selected_action": ids}
    denied = _client(_staff("retry_taskrecord"))
    denied.post(reverse(CHANGELIST), form)
    assert not LogEntry.objects.exists()
    allowed = _client(_staff("revoke_taskrecord"))
    assert allowed.post(reverse(CHANGELIST), form).status_code == 302
    assert sorted(LogEntry.objects.values_list("object_id", flat=True)) == sorted(ids)


@pytest.mark.django_db(transaction=True)  # PostgreSQL: a failed query ends a transaction
def test_action_on_a_dead_database_or_a_bad_id_gives_a_page_not_a_500():
    _records("default", 1)
    record = TaskRecord.objects.get()
    client = _client(User.objects.create_superuser("root-db", password="x"))
    client.raise_request_exception = False
    url = reverse("admin:django_celery_adv_taskrecord_revoke", args=[record.pk])
    assert client.post(url.replace(f"/{record.pk}/", "/abc/")).status_code == 404
    table = TaskRecord._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} RENAME TO {table}_away")
    try:
        response = client.post(url)
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {table}_away RENAME TO {table}")
    assert response.status_code == 503
    assert "database is unavailable" in response.content.decode()


@pytest.mark.parametrize("args", ["([[[...]]],)", "(" + repr("x" * 1030)[:-1] + "...',)"])
def test_retry_refuses_arguments_celery_shortened(args):
    from django_celery_adv.events import operations

    record = TaskRecord(app_alias="default", task_id="short-1", name="events.default.work",
                        args=args, kwargs="{}", retryable=True)
    with pytest.raises(operations.TaskActionError):
        operations._arguments(record)


@pytest.mark.django_db(transaction=True)
def test_counters_survive_a_failed_stats_write_after_the_records_were_written(monkeypatch):
    recorder = AppRecorder("default", store_settings(), enable_events=False)
    for event in _events("stats-1"):
        recorder.on_event(event)
    real = store.update_stats

    def down(*args, **kwargs):
        raise store.transaction.TransactionManagementError("database went away")

    monkeypatch.setattr(store, "update_stats", down)
    recorder.flush()  # the records are committed, the counters row is not
    assert TaskRecord.objects.get(task_id="stats-1").state == "SUCCESS"
    monkeypatch.setattr(store, "update_stats", real)
    recorder.flush()
    stats = TaskRecorderStats.objects.get(app_alias="default")
    assert stats.events_seen == 3 and stats.events_written == 3
    assert stats.task_counts.get("t.x") == {"RECEIVED": 1, "STARTED": 1, "SUCCESS": 1}
