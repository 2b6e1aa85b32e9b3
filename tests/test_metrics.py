"""The Prometheus ``/metrics`` view: numbers, access, no broadcast, dead servers, the docs.

Real servers throughout: the database of the test settings, Redis and RabbitMQ
brokers (messages really published, lengths really read), the Redis lock
backend with real leases. No worker is needed: a scrape reads only what was
stored, which is the point.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from unittest import mock

import prometheus_client
import pytest
import yaml
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone
from kombu import pidbox
from prometheus_client.parser import text_string_to_metric_families

from django_celery_adv import checks, monitoring
from django_celery_adv.locks.backends import lock_backends
from django_celery_adv.locks.backends.base import Holder
from django_celery_adv.metrics import metric_names
from django_celery_adv.models import (
    BeatNode,
    LockDefinition,
    TaskFailure,
    TaskRecord,
    TaskRecorderStats,
)
from django_celery_adv.registry import apps
from tests.faults.servers import spare_port

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-metrics-token-0123456789"
URL = "/celery-adv/metrics"


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, as Prometheus's own parser reads the page."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict, metric: str, /, **labels: str) -> float | None:
    return found.get((metric, frozenset(labels.items())))


def scrape(client: Client, **headers: str) -> dict:
    response = client.get(URL, **headers)
    assert response.status_code == 200, response.content[:500]
    assert response["Content-Type"].startswith("text/plain")
    return samples(response.content.decode())


@pytest.fixture
def operator(db) -> User:
    user = User.objects.create_user("metrics-operator", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_monitoring"))
    return user


@pytest.fixture
def operator_client(operator) -> Client:
    client = Client()
    client.force_login(operator)
    return client


@pytest.fixture
def seen_workers() -> Iterator[None]:
    monitoring.forget_workers()
    yield
    monitoring.forget_workers()


@contextmanager
def counting_broadcasts() -> Iterator[list[str]]:
    """Every control command sent (broadcast or inspect) in the block, by name."""
    sent: list[str] = []
    publish, broadcast = pidbox.Mailbox._publish, pidbox.Mailbox._broadcast

    def counted_publish(self, type, *args, **kwargs):
        sent.append(type)
        return publish(self, type, *args, **kwargs)

    def counted_broadcast(self, command, *args, **kwargs):
        sent.append(command)
        return broadcast(self, command, *args, **kwargs)

    with mock.patch.object(pidbox.Mailbox, "_publish", counted_publish), \
            mock.patch.object(pidbox.Mailbox, "_broadcast", counted_broadcast):
        yield sent


# -- the numbers ---------------------------------------------------------------------

def seed(now) -> None:
    record = {"app_alias": "default", "name": "t.add", "updated_at": now}
    for runtime, wait in ((0.02, 0.001), (0.3, 0.2), (2.0, 0.6)):
        TaskRecord.objects.create(task_id=str(uuid.uuid4()), state="SUCCESS", runtime=runtime,
                                  queue_wait=wait, **record)
    TaskRecord.objects.create(task_id=str(uuid.uuid4()), state="FAILURE", runtime=0.07,
                              queue_wait=0.05, **record)
    for state in ("STARTED", "STARTED", "RECEIVED"):
        TaskRecord.objects.create(task_id=str(uuid.uuid4()), state=state, **record)
    TaskRecord.objects.create(task_id=str(uuid.uuid4()), state="SUCCESS", runtime=1.0,
                              app_alias="global", name="reports.tasks.build", updated_at=now)
    # Finished before the histogram window (300 s): counted nowhere.
    TaskRecord.objects.create(task_id=str(uuid.uuid4()), state="SUCCESS", runtime=0.01,
                              queue_wait=0.01, app_alias="default", name="t.add",
                              updated_at=now - timedelta(seconds=400))
    TaskRecorderStats.objects.create(
        app_alias="default", events_seen=1000, events_dropped=7,
        last_event_at=now - timedelta(seconds=30),
        task_counts={"t.add": {"RECEIVED": 10, "STARTED": 9, "SUCCESS": 8, "FAILURE": 1},
                     "(other)": {"SUCCESS": 4}},
        workers={"w3@h": {"active": 4, "heartbeat_at": time.time() - 2},
                 "w1@h": {"active": 1, "heartbeat_at": time.time() - 1},
                 "w4@h": {"active": 9, "heartbeat_at": time.time() - 500},
                 "w5@h": {"active": 0, "heartbeat_at": time.time() - 1, "offline": True}})
    failure = {"task_name": "t.add", "exception_type": "ValueError", "first_seen": now,
               "last_seen": now, "count": 1}
    TaskFailure.objects.create(fingerprint="a", app_alias="default", **failure)
    TaskFailure.objects.create(fingerprint="b", app_alias="default", **failure)
    TaskFailure.objects.create(fingerprint="c", app_alias="default", resolved=True, **failure)
    TaskFailure.objects.create(fingerprint="d", app_alias="global", **failure)
    BeatNode.objects.create(app_alias="default", hostname="h", pid=1, role="leader",
                            started_at=now, last_tick=now - timedelta(seconds=20),
                            max_interval=5)


def test_scrape_shows_the_stored_numbers(operator_client, seen_workers):
    now = timezone.now()
    seed(now)
    monitoring.save_seen("default", {"w1@h": time.time() - 1, "w2@h": time.time() - 300})
    found = scrape(operator_client)

    def v(metric: str, /, **labels: str) -> float | None:
        return value(found, metric, **labels)

    assert v("celery_adv_tasks_total", app="default", name="t.add", state="SUCCESS") == 8
    assert v("celery_adv_tasks_total", app="default", name="t.add", state="FAILURE") == 1
    assert v("celery_adv_tasks_total", app="default", name="(other)", state="SUCCESS") == 4
    assert v("celery_adv_tasks_unfinished", app="default", name="t.add", state="STARTED") == 2
    assert v("celery_adv_tasks_unfinished", app="default", name="t.add", state="RECEIVED") == 1
    # Records finished within the window only: 0.02, 0.07, 0.3, 2.0.
    runtime = {le: v("celery_adv_task_runtime_seconds_bucket", app="default", name="t.add",
                     le=le) for le in ("0.05", "0.1", "0.5", "1.0", "5.0", "+Inf")}
    assert runtime == {"0.05": 1, "0.1": 2, "0.5": 3, "1.0": 3, "5.0": 4, "+Inf": 4}
    assert v("celery_adv_task_runtime_seconds_gcount", app="default", name="t.add") == 4
    assert v("celery_adv_task_runtime_seconds_gsum", app="default",
             name="t.add") == pytest.approx(2.39)
    # Queue wait per app: 0.001, 0.05, 0.2, 0.6 (the global app's record has none).
    assert v("celery_adv_task_queue_wait_seconds_bucket", app="default", le="0.05") == 2
    assert v("celery_adv_task_queue_wait_seconds_bucket", app="default", le="0.5") == 3
    assert v("celery_adv_task_queue_wait_seconds_gcount", app="default") == 4
    assert v("celery_adv_task_queue_wait_seconds_gcount", app="global") is None
    assert v("celery_adv_task_runtime_seconds_gcount", app="global",
             name="reports.tasks.build") == 1
    assert v("celery_adv_events_total", app="default") == 1000
    assert v("celery_adv_events_dropped_total", app="default") == 7
    assert 29 <= v("celery_adv_recorder_last_event_age_seconds", app="default") < 60
    assert v("celery_adv_task_failure_groups_open", app="default") == 2
    assert v("celery_adv_task_failure_groups_open", app="global") == 1
    assert v("celery_adv_task_failure_groups_open", app="twin") == 0
    assert v("celery_adv_beat_leader", app="default") == 1
    assert v("celery_adv_beat_leader", app="global") == 0
    assert 19 <= v("celery_adv_beat_last_tick_age_seconds", app="default") < 60
    assert v("celery_adv_beat_last_tick_age_seconds", app="global") is None
    # w2 was last seen 300 s ago, beyond MONITORING["SILENT_WINDOW"] (60 s); w3 only
    # heartbeats; w4's last heartbeat is too old; w5 said it went offline.
    assert v("celery_adv_workers_up", app="default") == 2
    up = {name: v("celery_adv_worker_up", app="default", worker=name)
          for name in ("w1@h", "w2@h", "w3@h", "w4@h", "w5@h")}
    assert up == {"w1@h": 1, "w2@h": 0, "w3@h": 1, "w4@h": 0, "w5@h": 0}
    # Active tasks from fresh heartbeats only (w4's 9 is stale: unknown, no series).
    assert v("celery_adv_worker_tasks_active", app="default", worker="w3@h") == 4
    assert v("celery_adv_worker_tasks_active", app="default", worker="w1@h") == 1
    assert v("celery_adv_worker_tasks_active", app="default", worker="w4@h") is None
    assert v("celery_adv_tasks_active", app="default") == 5
    assert v("celery_adv_workers_up", app="twin") == 0
    assert not [key for key in found if key[0] == "celery_adv_scrape_error"]
    # Every series carries the app label, and every name is one the collector declares.
    assert all(dict(labels).get("app") for _, labels in found)
    assert {name for name, _ in found} <= metric_names()


def test_pruning_the_history_never_lowers_a_counter(operator_client):
    """Retention deletes task records; the task counters come from the recorder's
    cumulative counters, so a prune is not a counter reset for Prometheus."""
    from django_celery_adv.events.store import prune

    seed(timezone.now())
    before = scrape(operator_client)
    assert prune("default", days=None, keep=0).by_count == 8
    after = scrape(operator_client)
    counters = {key: val for key, val in before.items() if key[0] == "celery_adv_tasks_total"}
    assert len(counters) == 5
    assert all(after[key] == val for key, val in counters.items())
    assert value(before, "celery_adv_tasks_unfinished", app="default", name="t.add",
                 state="STARTED") == 2
    assert value(after, "celery_adv_tasks_unfinished", app="default", name="t.add",
                 state="STARTED") is None


def test_lock_holders_and_capacity(operator_client):
    backend = lock_backends["redis"]
    name = f"metrics-{uuid.uuid4().hex[:8]}"
    LockDefinition.objects.create(name=name, backend="redis", capacity=3)
    leases = [backend.acquire(name, 3, Holder(task_id=f"t{i}"), 30) for i in range(2)]
    try:
        found = scrape(operator_client)
    finally:
        for lease in leases:
            backend.release(lease)
    assert value(found, "celery_adv_lock_holders", app="*", lock=name, backend="redis") == 2
    assert value(found, "celery_adv_lock_capacity", app="*", lock=name, backend="redis") == 3
    assert value(scrape(operator_client), "celery_adv_lock_holders", app="*", lock=name,
                 backend="redis") == 0


def test_queue_length_from_the_brokers(operator_client, clean_brokers):
    """Messages really waiting on Redis and RabbitMQ, in queues of two apps that no
    session worker consumes (the session's twin and global workers would take them)."""
    redis_url, amqp_url = settings.CELERY_ADV["APPS"]["twin"]["broker_url"], \
        settings.CELERY_ADV["APPS"]["global"]["broker_url"]
    extra = {"metrics_r": {"broker_url": redis_url, "task_default_queue": "metrics-r"},
             "metrics_a": {"broker_url": amqp_url, "task_default_queue": "metrics-a"}}
    sent = {"metrics_r": 5, "metrics_a": 3}
    with override_settings(CELERY_ADV={**settings.CELERY_ADV,
                                       "APPS": {**settings.CELERY_ADV["APPS"], **extra}}):
        for alias, count in sent.items():
            with apps[alias].connection_for_write() as connection:
                apps[alias].control.purge(connection=connection)
                for _ in range(count):
                    apps[alias].send_task("metrics.nothing", connection=connection)
        try:
            found = scrape(operator_client)
        finally:
            for alias in sent:
                with apps[alias].connection_for_write() as connection:
                    apps[alias].control.purge(connection=connection)
    assert value(found, "celery_adv_queue_length", app="metrics_r", queue="metrics-r") == 5
    assert value(found, "celery_adv_queue_length", app="metrics_a", queue="metrics-a") == 3


def test_a_scrape_sends_no_broadcast(operator_client, seen_workers):
    monitoring.save_seen("default", {"w1@h": time.time()})
    with counting_broadcasts() as sent:
        for _ in range(3):
            scrape(operator_client)
        assert sent == []
        # The counter sees what an inspect-based exporter does (so 0 above means 0).
        # (_broadcast publishes through _publish: one command, counted at both levels.)
        apps["default"].control.inspect(timeout=0.05).ping()
        assert set(sent) == {"ping"}


@pytest.mark.workers
def test_workers_and_active_tasks_come_from_the_stored_reading(operator_client, default_worker):
    """A real worker running a task: the scrape shows it from the reading the monitor
    stored, and sends nothing to the worker itself."""
    from tests.testapp.monitoring_tasks import monitored_sleep

    result = monitored_sleep.apply_async(args=[3])
    deadline = time.monotonic() + 20
    status = None
    with_active = {"stats": {}, "active": {"safe": True}, "active_queues": {}}
    while time.monotonic() < deadline:
        status = monitoring.inspect_all(["default"], max_age=0, commands=with_active)["default"]
        worker = status.worker(default_worker.name)
        if worker is not None and (worker.running or 0) >= 1:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the task never showed up as running ({result.state}): {status}")
    with counting_broadcasts() as sent:
        found = scrape(operator_client)
    assert sent == []
    assert value(found, "celery_adv_worker_up", app="default", worker=default_worker.name) == 1
    assert value(found, "celery_adv_worker_tasks_active", app="default",
                 worker=default_worker.name) >= 1
    assert value(found, "celery_adv_workers_up", app="default") >= 1
    assert value(found, "celery_adv_tasks_active", app="default") >= 1
    assert 0 <= value(found, "celery_adv_reading_age_seconds", app="default") < 20
    result.get(timeout=30)


def test_our_text_is_what_prometheus_client_writes(db):
    """render() writes the text itself (speed): byte for byte generate_latest's output,
    label values with quotes, backslashes, newlines and non-ASCII included."""
    from prometheus_client import CollectorRegistry, generate_latest

    from django_celery_adv.metrics import CeleryAdvCollector, render

    now = timezone.now()
    seed(now)
    odd = 'odd "name" \\ with\nnewline, \u00e9t\u00e9'
    TaskRecord.objects.create(app_alias="twin", task_id="odd", name=odd, state="SUCCESS",
                              runtime=0.2, updated_at=now)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CeleryAdvCollector())
    expected = generate_latest(registry).decode()
    ours = render()[0].decode()
    strip = re.compile(r"^celery_adv_scrape_duration_seconds.*\n|"
                       r"^celery_adv_reading_age_seconds.*\n|"
                       r"^celery_adv_\w+_age_seconds.*\n", re.M)
    assert strip.sub("", ours) == strip.sub("", expected)
    assert value(samples(ours), "celery_adv_task_runtime_seconds_gcount", app="twin",
                 name=odd) == 1


def test_only_our_registry(operator_client):
    scrape(operator_client)
    assert not [name for name in prometheus_client.REGISTRY._names_to_collectors
                if name.startswith("celery_adv")]


# -- dead servers -----------------------------------------------------------------------

def test_dead_broker_and_lock_server_give_error_series(operator_client):
    dead_port = spare_port()
    config = {**settings.CELERY_ADV,
              "APPS": {**settings.CELERY_ADV["APPS"],
                       "dead": {"broker_url": f"redis://127.0.0.1:{dead_port}/0"}},
              "LOCK_BACKENDS": {**settings.CELERY_ADV["LOCK_BACKENDS"],
                                "deadlocks": {
                                    "BACKEND": "django_celery_adv.locks.backends.redis."
                                               "RedisBackend",
                                    "OPTIONS": {"url": f"redis://:pw@127.0.0.1:{dead_port}/0"}}},
              "METRICS": {"SERVER_TIMEOUT": 0.5}}
    with override_settings(CELERY_ADV=config):
        LockDefinition.objects.create(name="on-a-dead-server", backend="deadlocks")
        LockDefinition.objects.create(name="also-on-it", backend="deadlocks")
        started = time.monotonic()
        response = operator_client.get(URL)
        took = time.monotonic() - started
    assert response.status_code == 200
    text = response.content.decode()
    found = samples(text)
    assert value(found, "celery_adv_scrape_error", app="dead", source="queues",
                 error="BrokerError") == 1
    assert value(found, "celery_adv_scrape_error", app="*", source="locks:deadlocks",
                 error="LockError") == 1
    assert not [key for key in found if key[0] == "celery_adv_queue_length"
                and dict(key[1])["app"] == "dead"]
    assert value(found, "celery_adv_lock_capacity", app="*", lock="on-a-dead-server",
                 backend="deadlocks") == 1
    assert value(found, "celery_adv_lock_holders", app="*", lock="on-a-dead-server",
                 backend="deadlocks") is None
    # The live apps are still there, and the secret of the dead URL is nowhere.
    assert value(found, "celery_adv_queue_length", app="twin", queue="twin") is not None
    assert "pw@" not in text
    assert took < 5, took


def test_a_stalled_broker_or_lock_server_costs_at_most_the_server_timeout(operator_client):
    """A server that accepts connections and never answers (a listening socket nobody
    serves), as a broker and as a lock server whose own socket timeout is 5 s: the
    scrape still answers within SERVER_TIMEOUT plus the grace, with error series."""
    import socket

    from django_celery_adv.metrics.collector import BACKGROUND_GRACE

    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(16)
        url = f"redis://127.0.0.1:{stalled.getsockname()[1]}/0"
        config = {**settings.CELERY_ADV,
                  "APPS": {**settings.CELERY_ADV["APPS"], "stalled": {"broker_url": url}},
                  "LOCK_BACKENDS": {**settings.CELERY_ADV["LOCK_BACKENDS"], "stalledlocks": {
                      "BACKEND": "django_celery_adv.locks.backends.redis.RedisBackend",
                      "OPTIONS": {"url": url, "socket_timeout": 5}}},
                  "METRICS": {"SERVER_TIMEOUT": 0.3}}
        with override_settings(CELERY_ADV=config):
            LockDefinition.objects.create(name="on-a-stalled-server", backend="stalledlocks",
                                          capacity=4)
            started = time.monotonic()
            found = scrape(operator_client)
            took = time.monotonic() - started
    # Bounded well below the lock server's 5 s socket timeout; the rest is the
    # database sources, rendering and the test client on a loaded machine.
    assert took < 0.3 + BACKGROUND_GRACE + 2, took
    errors = {(dict(labels)["app"], dict(labels)["source"]): dict(labels)["error"]
              for name, labels in found if name == "celery_adv_scrape_error"}
    assert errors.get(("*", "lock_servers")) == "Timeout", errors
    assert errors.get(("stalled", "queues")) == "BrokerError" or \
        errors.get(("*", "queues")) == "Timeout", errors
    assert value(found, "celery_adv_lock_capacity", app="*", lock="on-a-stalled-server",
                 backend="stalledlocks") == 4
    assert value(found, "celery_adv_workers_up", app="stalled") == 0
    assert value(found, "celery_adv_task_failure_groups_open", app="stalled") == 0


def test_a_failing_source_is_an_error_series_not_a_500(operator_client):
    from django.db import DatabaseError

    with mock.patch("django_celery_adv.beat.health.app_health",
                    side_effect=DatabaseError("no such table")):
        found = scrape(operator_client)
    assert value(found, "celery_adv_scrape_error", app="*", source="beat",
                 error="DatabaseError") == 1
    assert value(found, "celery_adv_task_failure_groups_open", app="default") == 0


# -- who may scrape ---------------------------------------------------------------------

def test_anonymous_is_sent_to_the_login_page(client, db):
    response = client.get(URL)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    assert reverse("django_celery_adv:metrics") == URL


def test_staff_without_the_permission_is_refused(client, db):
    client.force_login(User.objects.create_user("staff", is_staff=True))
    assert client.get(URL).status_code == 403


def test_with_the_permission(operator_client):
    assert operator_client.get(URL).status_code == 200
    assert operator_client.post(URL).status_code == 405


@override_settings(CELERY_ADV={**settings.CELERY_ADV, "METRICS": {"TOKEN": TOKEN}})
def test_bearer_token(client, db):
    assert client.get(URL, HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 200
    assert client.get(URL, HTTP_AUTHORIZATION=f"bearer  {TOKEN} ").status_code == 200
    for wrong in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ", f"Basic {TOKEN}",
                  TOKEN):
        response = client.get(URL, HTTP_AUTHORIZATION=wrong)
        assert response.status_code == 401, wrong
        assert response["WWW-Authenticate"].startswith("Bearer")
    # A wrong token is refused even with a session that would be let in.
    user = User.objects.create_user("op", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_monitoring"))
    client.force_login(user)
    assert client.get(URL, HTTP_AUTHORIZATION="Bearer nope").status_code == 401


def test_no_token_configured_refuses_every_bearer(client, db):
    assert client.get(URL, HTTP_AUTHORIZATION="Bearer ").status_code == 401
    assert client.get(URL, HTTP_AUTHORIZATION="Bearer None").status_code == 401


def test_check_e019():
    assert checks.check_metrics({}) == []
    assert checks.check_metrics({"TOKEN": TOKEN, "SERVER_TIMEOUT": 0.2}) == []
    for bad in ({"TOKEN": "short"}, {"TOKEN": 12345678901234567}, {"SERVER_TIMEOUT": 0},
                {"HISTOGRAM_WINDOW": -1},
                {"SERVER_TIMEOUT": True}, {"TOKENS": TOKEN}, ["TOKEN"]):
        messages = checks.check_metrics(bad)
        assert [m.id for m in messages] == ["django_celery_adv.E019"], bad
        assert "short" not in str(messages[0].msg)
    with override_settings(CELERY_ADV={**settings.CELERY_ADV, "METRICS": {"TOKEN": "x"}}):
        ids = [m.id for m in checks.check_celery_adv_settings()]
    assert "django_celery_adv.E019" in ids


# -- the docs' dashboard and alert rules use only what we export ---------------------------

METRIC = re.compile(r"\bcelery_adv_[a-z_]+")


def test_grafana_dashboard_and_alert_rules():
    known = metric_names()
    dashboard = json.loads((ROOT / "docs" / "grafana" / "celery-adv.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"]
                   for target in panel.get("targets", ())]
    expressions += [var.get("query", {}).get("query", "") if isinstance(var.get("query"), dict)
                    else var.get("query", "") for var in dashboard["templating"]["list"]]
    rules = yaml.safe_load((ROOT / "docs" / "prometheus" / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len(alerts) >= 5 and all({"alert", "expr", "labels", "annotations"} <= set(rule)
                                    for rule in alerts)
    used = {name for expr in [*expressions, *(rule["expr"] for rule in alerts)]
            for name in METRIC.findall(expr)}
    assert len(used) >= 10
    assert used <= known, used - known
