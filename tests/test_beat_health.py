"""Beat pieces without a beat process: leadership against a real lock server that
goes away, health rows read by ``celery_status`` and the admin, the admin's
"run now" through the task's own app, and the BEAT system checks."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from django_celery_adv.beat.config import beat_settings
from django_celery_adv.beat.leadership import Leadership
from django_celery_adv.checks import check_beat_settings
from django_celery_adv.models import BeatNode
from tests.beats import Collector
from tests.faults.servers import RedisServer, spare_port


def with_fault_backend(url: str):
    backends = {**settings.CELERY_ADV["LOCK_BACKENDS"], "fault": {
        "BACKEND": "django_celery_adv.locks.backends.redis.RedisBackend",
        "OPTIONS": {"url": url, "prefix": "beat-unit:"}}}
    return override_settings(CELERY_ADV={**settings.CELERY_ADV, "LOCK_BACKENDS": backends,
                                         "BEAT": {"LOCK_BACKEND": "fault", "TTL": 3}})


def test_a_failed_take_is_never_leadership():
    with with_fault_backend(f"redis://127.0.0.1:{spare_port()}/0"):  # nobody listens
        leadership = Leadership(beat_settings("default"))
        leadership.refresh()  # never raises
        assert leadership.lease is None and not leadership.leading
        assert not leadership.may_send()


def test_a_failed_renewal_stops_sends_at_once_and_a_lost_lease_steps_down():
    server = RedisServer().start()
    try:
        with with_fault_backend(server.url):
            leader = Leadership(beat_settings("default"))
            standby = Leadership(beat_settings("default"))
            leader.refresh()
            standby.refresh()
            assert leader.may_send() and not standby.may_send()
            token = leader.token

            server.stop()
            leader._renewed_at = float("-inf")  # a renewal is due at this tick
            leader.refresh()
            # Still valid by its clock, but its renewal failed: no send.
            assert leader.lease is not None and leader.lease.remaining() > 1
            assert not leader.may_send() and not leader.leading

            server.start()  # no persistence: the lease is gone from the server
            leader._renewed_at = float("-inf")
            leader.refresh()  # renew says lost: steps down, then takes it anew
            assert leader.lease is None or leader.token != token or leader.leading
            standby.refresh()
            assert [leader.may_send(), standby.may_send()].count(True) == 1
    finally:
        server.remove()


def node(alias: str, role: str, age: float, **fields) -> BeatNode:
    now = timezone.now()
    return BeatNode.objects.create(
        app_alias=alias, hostname="host-a", pid=fields.pop("pid", 100), role=role,
        token=fields.pop("token", 7 if role == "leader" else None),
        leader_since=now - timedelta(minutes=5) if role == "leader" else None,
        max_interval=2.5, started_at=now - timedelta(minutes=10),
        last_tick=now - timedelta(seconds=age), **fields)


def status(*args: str) -> tuple[int, str]:
    out = StringIO()
    try:
        call_command("celery_status", *args, stdout=out)
        return 0, out.getvalue()
    except CommandError as e:
        return e.returncode, out.getvalue() + str(e)


@pytest.mark.django_db
def test_celery_status_beat_text_json_and_exit_codes():
    node("default", "leader", 1.0, next_due_name="every-second",
         next_due_at=timezone.now() + timedelta(seconds=1))
    node("default", "standby", 0.5, pid=101)
    node("global", "leader", 60.0)  # last tick older than 3 x 2.5 s
    code, out = status("beat", "--app", "default")
    assert code == 0, out
    assert "leader host-a pid 100: token 7" in out and "next due: every-second" in out
    assert "standby host-a pid 101" in out

    code, out = status("beat", "--app", "global")
    assert code == 1 and "beat leader host-a pid 100 last ticked 60 s ago" in out

    code, out = status("beat", "--app", "twin", "--json")
    assert code == 1 and json.loads(out.partition("unhealthy")[0])["twin"]["beat"] == {
        "healthy": False, "problem": "no beat leader", "leader": None, "standbys": [],
        "gone": []}
    code, out = status("beat", "--json")
    data = json.loads(out.partition("unhealthy")[0])
    assert data["default"]["beat"]["healthy"] and data["default"]["beat"]["leader"]["token"] == 7


@pytest.mark.django_db
@pytest.mark.workers
def test_require_beat_adds_beat_to_the_health_check(default_worker):
    node("default", "leader", 1.0)
    assert status("--require-beat", "--app", "default")[0] == 0
    BeatNode.objects.update(last_tick=timezone.now() - timedelta(seconds=30))
    assert status("--app", "default")[0] == 0  # its worker is online: healthy without beat
    code, out = status("--require-beat", "--app", "default")
    assert code == 1 and "unhealthy: default (beat leader host-a pid 100 last ticked 3" in out
    code, out = status("--require-beat", "--app", "default", "--json")
    assert json.loads(out.partition("unhealthy")[0])["default"]["beat"]["healthy"] is False


@pytest.mark.django_db
def test_admin_shows_who_leads_each_app(client):
    node("default", "leader", 1.0)
    node("default", "standby", 0.5, pid=101)
    client.force_login(User.objects.create_superuser("admin", "a@example.com", "pw"))
    page = client.get("/admin/django_celery_adv/beatnode/").content.decode()
    assert "host-a (pid 100)" in page and "host-a (pid 101)" in page
    assert "no beat leader" in page  # global and twin have no beat


@pytest.mark.django_db
def test_monitoring_workers_page_shows_who_leads_each_app(client, monkeypatch):
    from django_celery_adv.admin import monitoring as monitoring_admin
    from django_celery_adv.monitoring import AppStatus

    # The workers themselves are test_monitoring_admin's: no broker round trips here.
    monkeypatch.setattr(monitoring_admin, "inspect_all", lambda aliases=None: {
        alias: AppStatus(alias=alias, broker="memory://", reachable=True, error=None,
                         workers=[]) for alias in settings.CELERY_ADV["APPS"]})
    node("default", "leader", 1.0, token=42)
    node("default", "standby", 0.5, pid=101)
    node("global", "leader", 600.0, pid=102)  # its only beat stopped ticking long ago
    client.force_login(User.objects.create_superuser("admin", "a@example.com", "pw"))
    page = client.get("/admin/django_celery_adv/monitoring/").content.decode()
    beat = page.partition('id="beat"')[2].partition("</table>")[0]
    assert "host-a (pid 100)" in beat and "<td>42</td>" in beat
    assert "host-a (pid 101)" in beat
    # An app that ran beat and has no live leader is a problem; one that never ran
    # beat (twin) is not shown at all (it is not an error to run no beat).
    assert ">global<" in beat and ">twin<" not in beat


@pytest.mark.django_db
@pytest.mark.workers
def test_admin_run_now_sends_through_the_tasks_own_app(client):
    redis_side = Collector(settings.REDIS_URL).start()
    amqp_side = Collector(settings.AMQP_URL, queue=redis_side.queue_name).start()
    try:
        interval, _ = IntervalSchedule.objects.get_or_create(every=1, period="hours")
        row = PeriodicTask.objects.create(name="nightly", task="reports.tasks.nightly",
                                          interval=interval, queue=redis_side.queue_name)
        client.force_login(User.objects.create_superuser("admin", "a@example.com", "pw"))
        response = client.post("/admin/django_celery_beat/periodictask/",
                               {"action": "run_tasks", "_selected_action": [row.pk]})
        assert response.status_code == 302
        from tests.faults.servers import wait_until

        wait_until(lambda: amqp_side.sent, 10, "the task on the global app's broker")
        assert [sent.task for sent in amqp_side.sent] == ["reports.tasks.nightly"]
        assert redis_side.sent == []
    finally:
        redis_side.stop()
        amqp_side.stop()


@pytest.mark.django_db
def test_admin_app_choice_is_saved_shown_and_follows_a_rename(client):
    from django_celery_adv.models import PeriodicTaskApp

    interval, _ = IntervalSchedule.objects.get_or_create(every=1, period="hours")
    client.force_login(User.objects.create_superuser("admin", "a@example.com", "pw"))
    form = {"name": "chosen", "task": "beat_tests.chosen_job", "interval": interval.pk,
            "enabled": "on", "args": "[]", "kwargs": "{}", "headers": "{}", "app": "global"}
    response = client.post("/admin/django_celery_beat/periodictask/add/", form)
    assert response.status_code == 302, response.content.decode()[-3000:]
    assert PeriodicTaskApp.objects.get().app_alias == "global"
    row = PeriodicTask.objects.get(name="chosen")
    page = client.get(f"/admin/django_celery_beat/periodictask/{row.pk}/change/").content
    assert b'<option value="global" selected>' in page
    assert b"<td class=\"field-app\">global</td>" in client.get(
        "/admin/django_celery_beat/periodictask/").content

    client.post(f"/admin/django_celery_beat/periodictask/{row.pk}/change/",
                {**form, "name": "renamed"})
    assert list(PeriodicTaskApp.objects.values_list("periodic_task", "app_alias")) == [
        ("renamed", "global")]
    client.post(f"/admin/django_celery_beat/periodictask/{row.pk}/change/",
                {**form, "name": "renamed", "app": ""})
    assert not PeriodicTaskApp.objects.exists()


@pytest.mark.parametrize(("beat", "ids"), [
    ({}, []),
    ("x", ["E020"]),
    ({"TTL": 0.5, "ON_BUSY": "retry", "LOCKS": 1}, ["E020", "E022", "E024"]),
    ({"LOCK_BACKEND": "nope", "MISFIRE_GRACE": {"a*": -1}}, ["E021", "E023"]),
    ({"APPS": {"nope": {"TTL": 5}, "global": {"TTL": "x"}}}, ["E025", "E022"]),
    ({"APPS": {"global": {"LOCK_BACKEND": "redis", "MISFIRE_GRACE": 30}}}, []),
])
def test_beat_settings_checks(beat, ids):
    with override_settings(CELERY_ADV={**settings.CELERY_ADV, "BEAT": beat}):
        messages = check_beat_settings()
    assert sorted(m.id.rpartition(".")[2] for m in messages) == sorted(ids), messages


@pytest.fixture
def leading_scheduler(transactional_db):
    """A LockedScheduler of the default app in this process, leading (database lease)."""
    from django_celery_adv.beat import LockedScheduler
    from django_celery_adv.registry import apps

    collector = Collector(settings.REDIS_URL).start()
    interval, _ = IntervalSchedule.objects.get_or_create(every=1, period="seconds")
    PeriodicTask.objects.create(name="tick", task="beat_tests.tick", interval=interval,
                                queue=collector.queue_name,
                                last_run_at=timezone.now() - timedelta(hours=1))
    scheduler = LockedScheduler(app=apps["default"])
    scheduler.leadership.refresh()
    assert scheduler.leadership.may_send()
    yield scheduler, collector
    scheduler.close()
    collector.stop()


def run_due(scheduler, name: str = "tick") -> None:
    entry = scheduler.schedule[name]
    scheduler.reserve(entry)
    scheduler.apply_entry(entry, producer=scheduler.producer)


def test_a_run_another_leader_recorded_is_not_sent_again(leading_scheduler):
    from tests.faults.servers import wait_until

    scheduler, collector = leading_scheduler
    # Another leader sent this run meanwhile: its write-ahead moved last_run_at.
    PeriodicTask.objects.filter(name="tick").update(last_run_at=timezone.now())
    run_due(scheduler)
    assert PeriodicTask.objects.get(name="tick").total_run_count == 0
    assert scheduler._initial_read  # the schedule is re-read from the database

    run_due(scheduler)  # read again: the row's last run, so this one is its own
    wait_until(lambda: collector.sent, 10, "the send")
    row = PeriodicTask.objects.get(name="tick")
    assert row.total_run_count == 1 and row.last_run_at > timezone.now() - timedelta(seconds=5)
    [sent] = collector.sent
    assert (sent.token, sent.app) == (scheduler.leadership.token, "default")


def test_a_run_later_than_its_misfire_grace_is_skipped(leading_scheduler):
    import time

    scheduler, collector = leading_scheduler
    with override_settings(CELERY_ADV={**settings.CELERY_ADV,
                                       "BEAT": {"MISFIRE_GRACE": {"ti*": 60}}}):
        scheduler.settings = beat_settings("default")
    run_due(scheduler)  # due an hour ago: past its 60 s grace
    time.sleep(1)
    assert collector.sent == []
    assert PeriodicTask.objects.get(name="tick").total_run_count == 1  # counted as done


def test_a_standby_sends_nothing(leading_scheduler):
    import time

    scheduler, collector = leading_scheduler
    scheduler.leadership.release()
    run_due(scheduler)
    time.sleep(1)
    assert collector.sent == []
    assert PeriodicTask.objects.get(name="tick").total_run_count == 0


@pytest.mark.django_db
def test_max_interval_is_capped_below_a_third_of_the_ttl():
    from django_celery_adv.beat import LockedScheduler
    from django_celery_adv.registry import apps

    with override_settings(CELERY_ADV={**settings.CELERY_ADV, "BEAT": {"TTL": 10}}):
        scheduler = LockedScheduler(app=apps["default"], lazy=True, max_interval=300)
    assert scheduler.max_interval == 2.5 < 10 / 3
    assert "lease 'beat.default' on lock backend 'default', TTL 10 s" in scheduler.info


# -- beat_on_busy: a lock definition's choice at beat, over the app's ON_BUSY -------------

@pytest.mark.parametrize(("row", "app", "sent"), [
    ("skip", "send", False),  # the definition's choice wins over the app's
    ("send", "skip", True),
    ("", "skip", False),      # empty: the app's setting
    ("", "send", True),
])
def test_beat_on_busy_of_the_lock_definition_decides_a_busy_run(leading_scheduler, caplog,
                                                                 row, app, sent):
    import logging
    import os

    import tests.testapp.beat_tasks  # noqa: F401 (registers beat_tests.locked_job)
    from django_celery_adv.locks import lock
    from django_celery_adv.locks.backends.base import HOSTNAME
    from django_celery_adv.models import LockDefinition
    from tests.faults.servers import wait_until

    scheduler, collector = leading_scheduler
    PeriodicTask.objects.filter(name="tick").update(task="beat_tests.locked_job")
    scheduler._forget_schedule()
    LockDefinition.objects.create(name="beat-test-locked-job", beat_on_busy=row)
    with override_settings(CELERY_ADV={**settings.CELERY_ADV, "BEAT": {"ON_BUSY": app}}):
        scheduler.settings = beat_settings("default")

    with caplog.at_level(logging.INFO, logger="django_celery_adv.beat"), \
            lock("beat-test-locked-job"):  # the long-running instance
        run_due(scheduler)
    run_due(scheduler)  # free again: always sent
    # One queue keeps order: once the second run's message is in, the first's would be.
    wait_until(lambda: len(collector.sent) >= 1 + sent, 10, "the sends")
    assert len(collector.sent) == 1 + sent
    assert PeriodicTask.objects.get(name="tick").total_run_count == 2  # a skip counts as done
    skipped = [r for r in caplog.records if "skipped tick" in r.getMessage()]
    if sent:
        assert skipped == []
    else:
        [record] = skipped
        assert record.levelname == "INFO"
        assert f"held by host {HOSTNAME} (pid {os.getpid()})" in record.getMessage()


BEAT_ON_BUSY_FORM = {"backend": "default", "capacity": "1", "description": "", "ttl": "30",
                     "wait": "0", "on_busy": "retry", "retry_countdown": "5",
                     "retry_jitter": "1", "max_retries": ""}


@pytest.mark.django_db
@pytest.mark.parametrize(("value", "saved"), [("send", "send"), ("skip", "skip"), ("", ""),
                                             ("retry", None), ("SEND", None)])
def test_beat_on_busy_is_edited_and_validated_in_the_lock_admin(client, value, saved):
    from django_celery_adv.locks.definitions import policies
    from django_celery_adv.models import LockDefinition

    client.force_login(User.objects.create_superuser("admin", "a@example.com", "pw"))
    url = "/admin/django_celery_adv/lockdefinition/add/"
    assert 'name="beat_on_busy"' in client.get(url).content.decode()
    response = client.post(url, {**BEAT_ON_BUSY_FORM, "name": "edited",
                                 "beat_on_busy": value})
    if saved is None:
        assert response.status_code == 200
        assert "beat_on_busy" in response.context["adminform"].form.errors
        assert not LockDefinition.objects.filter(name="edited").exists()
    else:
        assert response.status_code == 302
        assert LockDefinition.objects.get(name="edited").beat_on_busy == saved
        assert policies.get("edited", 1).beat_on_busy == saved
