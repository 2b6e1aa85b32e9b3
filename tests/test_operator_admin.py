"""Admin Queues page, purge and worker remote control: permissions, real brokers, real worker."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import User
from django.urls import reverse

from django_celery_adv.admin.worker_control import ACTIONS
from django_celery_adv.monitoring import forget_workers
from django_celery_adv.registry import apps
from tests.test_monitoring import SECRET, with_down_apps
from tests.test_monitoring_admin import make_user
from tests.test_queues import drop, fill, with_apps
from tests.workers import WorkerProcess

pytestmark = pytest.mark.django_db

QUEUES_URL = "admin:django_celery_adv_monitoring_queues"
PURGE_URL = "admin:django_celery_adv_monitoring_purge_queue"
CONTROL_URL = "admin:django_celery_adv_monitoring_worker_control"
ACTION_URL = "admin:django_celery_adv_monitoring_worker_action"

#: Valid POST data per action, aimed at the test worker.
ACTION_DATA = {
    "pool_grow": {"n": "1"},
    "pool_shrink": {"n": "1"},
    "autoscale": {"max_concurrency": "3", "min_concurrency": "1"},
    "add_consumer": {"queue": "hops-extra"},
    "cancel_consumer": {"queue": "hops-extra"},
    "rate_limit": {"task_name": "testapp.where_default", "rate": "10/m"},
    "time_limit": {"task_name": "testapp.where_default", "soft": "30", "hard": "60"},
}


@pytest.fixture(autouse=True)
def fresh_record():
    forget_workers()
    yield
    forget_workers()


@pytest.fixture(scope="module")
def ops_worker(django_db_blocker):
    """A prefork worker of "default" with one process, for this module only."""
    with django_db_blocker.unblock():
        worker = WorkerProcess("default", tag="-ops", concurrency=1).start()
    yield worker
    worker.stop()


def pool_size(worker: WorkerProcess) -> int:
    with worker.app.connection_for_write() as connection:
        stats = worker.app.control.inspect(destination=[worker.name], timeout=2, limit=1,
                                           connection=connection).stats() or {}
    return len(stats[worker.name]["pool"]["processes"])


def wait_for(predicate, timeout: float = 15.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def logged(object_id: str) -> list[str]:
    return list(LogEntry.objects.filter(object_id=object_id).order_by("pk")
                .values_list("change_message", flat=True))


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]] \
        if response.context and "messages" in response.context else []


# -- queues page and purge -------------------------------------------------------

def test_queues_page_shows_counts_and_a_dead_broker_in_place(client):
    name = f"hops-page-{uuid.uuid4().hex[:8]}"
    with with_apps(pageq={"broker_url": settings.REDIS_URL, "task_default_queue": name}), \
            with_down_apps():
        queue = fill("pageq", name, 12, priorities=1)
        try:
            client.force_login(make_user("viewer", "view_monitoring"))
            response = client.get(reverse(QUEUES_URL))
        finally:
            drop("pageq", queue)
    assert response.status_code == 200
    html = response.content.decode()
    assert f"<th scope=\"row\">{name}</th>" in html and "<td>12</td>" in html
    assert "Broker unreachable" in html and SECRET not in html
    assert "Purge" not in html.split('id="queues-pageq"')[1].split("</table>")[0]


def test_purge_needs_its_permission_confirms_with_the_count_and_is_logged(client):
    name = f"hops-purge-{uuid.uuid4().hex[:8]}"
    with with_apps(purgeq={"broker_url": settings.REDIS_URL, "task_default_queue": name}):
        queue = fill("purgeq", name, 25, priorities=1)
        try:
            url = reverse(PURGE_URL)
            query = {"app": "purgeq", "queue": name}
            anonymous = client.post(url, query)
            assert anonymous.status_code == 302 and "/admin/login/" in anonymous["Location"]
            client.force_login(make_user("viewer", "view_monitoring"))
            assert client.get(url, query).status_code == 403
            assert client.post(url, query).status_code == 403
            assert redis.Redis.from_url(settings.REDIS_URL).llen(name) == 25

            client.force_login(make_user("purger", "view_monitoring", "purge_queue"))
            page = client.get(url, query)
            assert page.status_code == 200
            assert '<strong class="dca-count">25</strong>' in page.content.decode()
            assert 'method="post"' in page.content.decode()
            assert redis.Redis.from_url(settings.REDIS_URL).llen(name) == 25  # GET purges nothing

            done = client.post(url, query, follow=True)
            assert done.redirect_chain[0][0] == reverse(QUEUES_URL)
            assert any("25 messages deleted" in m for m in messages_of(done))
            assert redis.Redis.from_url(settings.REDIS_URL).llen(name) == 0
            entry = LogEntry.objects.get(object_id=f"purgeq/queue:{name}")
            assert entry.user.username == "purger" and "25 messages deleted" in \
                entry.change_message
        finally:
            drop("purgeq", queue)


def test_purge_without_csrf_token_is_refused(client):
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(make_user("purger", "view_monitoring", "purge_queue"))
    response = strict.post(reverse(PURGE_URL), {"app": "default", "queue": "celery"})
    assert response.status_code == 403 and not LogEntry.objects.exists()


def test_purge_on_a_dead_broker_is_a_message(client):
    with with_down_apps():
        client.force_login(make_user("purger", "view_monitoring", "purge_queue"))
        query = {"app": "down_redis", "queue": "down_redis"}
        for response in (client.get(reverse(PURGE_URL), query, follow=True),
                         client.post(reverse(PURGE_URL), query, follow=True)):
            assert response.status_code == 200
            texts = messages_of(response)
            assert texts and ("cannot be purged" in texts[0] or "was not purged" in texts[0])
            assert SECRET not in " ".join(texts)
    # The POST is an operator action even when the broker fails: in the admin log.
    [entry] = LogEntry.objects.filter(object_id="down_redis/queue:down_redis")
    assert entry.user.username == "purger" and "failed" in entry.change_message
    assert SECRET not in entry.change_message


# -- worker remote control -------------------------------------------------------

@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_each_action_is_denied_without_its_permission(client, action):
    url = reverse(ACTION_URL, args=["default", "nobody@nowhere", action])
    data = ACTION_DATA.get(action, {})
    anonymous = client.post(url, data)
    assert anonymous.status_code == 302 and "/admin/login/" in anonymous["Location"]
    others = [a.permission for a in ACTIONS.values() if a.permission != ACTIONS[action].permission]
    client.force_login(make_user("staff", "view_monitoring", *others))
    assert client.post(url, data).status_code == 403
    assert client.get(url).status_code == 403
    assert not LogEntry.objects.exists()


def test_control_page_shows_only_the_permitted_actions(client):
    client.force_login(make_user("sizer", "view_monitoring", "resize_worker_pool"))
    html = client.get(reverse(CONTROL_URL, args=["default", "w@h"])).content.decode()
    assert 'id="action-pool_grow"' in html and 'id="action-pool_shrink"' in html
    assert 'id="action-shutdown"' not in html and 'id="action-rate_limit"' not in html


def test_every_action_allowed_with_its_permission_is_sent_and_logged(client, ops_worker):
    client.force_login(User.objects.create_superuser("root", password="pw"))
    for action, data in ACTION_DATA.items():
        url = reverse(ACTION_URL, args=["default", ops_worker.name, action])
        response = client.post(url, data, follow=True)
        assert response.status_code == 200, action
        texts = messages_of(response)
        assert texts and ops_worker.name in texts[0], (action, texts)
    entries = logged(f"default/worker:{ops_worker.name}")
    assert [entry.partition("(")[0] for entry in entries] == list(ACTION_DATA)
    outcomes = dict(zip(ACTION_DATA, entries, strict=True))
    assert ": ok: " in outcomes["rate_limit"] and ": ok: " in outcomes["time_limit"]
    assert ": ok: " in outcomes["add_consumer"] and ": ok: " in outcomes["cancel_consumer"]
    # This worker runs without --autoscale: Celery's own refusal, shown and logged.
    assert ": error: " in outcomes["autoscale"]


def test_pool_grow_and_shrink_change_the_real_pool(client, ops_worker):
    client.force_login(make_user("sizer", "view_monitoring", "resize_worker_pool"))
    before = pool_size(ops_worker)
    url = reverse(ACTION_URL, args=["default", ops_worker.name, "pool_grow"])
    response = client.post(url, {"n": "1"}, follow=True)
    assert any("pool will grow" in m for m in messages_of(response))
    assert wait_for(lambda: pool_size(ops_worker) == before + 1)
    url = reverse(ACTION_URL, args=["default", ops_worker.name, "pool_shrink"])
    client.post(url, {"n": "1"})
    assert wait_for(lambda: pool_size(ops_worker) == before)
    assert len(logged(f"default/worker:{ops_worker.name}")) == 2


def test_invalid_input_is_shown_not_sent(client):
    client.force_login(make_user("limiter", "view_monitoring", "set_task_rate_limit"))
    url = reverse(ACTION_URL, args=["default", "w@h", "rate_limit"])
    response = client.post(url, {"task_name": "x", "rate": "fast"})
    assert response.status_code == 200 and "errorlist" in response.content.decode()
    assert not LogEntry.objects.exists()


def test_control_on_a_dead_broker_is_a_readable_message(client):
    with with_down_apps():
        client.force_login(User.objects.create_superuser("root", password="pw"))
        url = reverse(ACTION_URL, args=["down_amqp", "w@h", "pool_grow"])
        response = client.post(url, {"n": "1"}, follow=True)
    assert response.status_code == 200
    texts = messages_of(response)
    assert texts and "w@h" in texts[0] and SECRET not in texts[0]
    assert ": error: " in logged("down_amqp/worker:w@h")[0]


def test_shutdown_confirms_then_stops_the_real_worker(client, ops_worker):
    client.force_login(make_user("stopper", "view_monitoring", "shutdown_worker"))
    url = reverse(ACTION_URL, args=["default", ops_worker.name, "shutdown"])
    confirm = client.get(url)
    assert confirm.status_code == 200 and ops_worker.name in confirm.content.decode()
    assert ops_worker.process.poll() is None  # GET alone sends nothing
    response = client.post(url, follow=True)
    workers_page = reverse("admin:django_celery_adv_monitoring_changelist")
    assert response.redirect_chain[-1][0] == workers_page
    assert wait_for(lambda: ops_worker.process.poll() is not None, timeout=20)
    assert logged(f"default/worker:{ops_worker.name}")[-1].startswith("shutdown(")


def test_purge_is_only_for_a_queue_of_the_app(client):
    server = redis.Redis.from_url(settings.REDIS_URL)
    key = f"hops-hash-{uuid.uuid4().hex[:8]}"
    server.hset(key, "field", "value")
    try:
        client.force_login(make_user("purger", "view_monitoring", "purge_queue"))
        for send in (client.get, client.post):
            assert send(reverse(PURGE_URL), {"app": "default", "queue": key}).status_code == 404
            assert send(reverse(PURGE_URL), {"app": "nope", "queue": "celery"}).status_code \
                == 404
        assert server.hget(key, "field") == b"value" and not LogEntry.objects.exists()
    finally:
        server.delete(key)


def test_task_name_fields_suggest_the_apps_tasks(client):
    # Registered on the app instance this process has now: an earlier test's
    # override_settings may have rebuilt "default" without the import-time tasks.
    @apps["default"].task(name="opsadmin.suggested")
    def suggested() -> None:
        """A task of the default app, for the suggestion list only."""
    client.force_login(make_user("limiter", "view_monitoring", "set_task_rate_limit"))
    html = client.get(reverse(CONTROL_URL, args=["default", "w@h"])).content.decode()
    assert 'list="dca-task-names"' in html
    assert '<option value="opsadmin.suggested">' in html
    assert '<option value="celery.' not in html
    assert '<option value="reports.tasks.build">' not in html  # TASK_APPS sends it to global
