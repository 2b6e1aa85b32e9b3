"""Admin monitoring pages: workers, worker detail, lock holders; permissions and masking."""

from __future__ import annotations

import time
from html.parser import HTMLParser

import pytest
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from django_celery_adv.admin import monitoring as monitoring_admin
from django_celery_adv.locks.backends import lock_backends
from django_celery_adv.locks.backends.base import Holder
from django_celery_adv.locks.definitions import policies
from django_celery_adv.masking import MASK
from django_celery_adv.models import LockDefinition, TaskRecorderStats
from django_celery_adv.monitoring import AppStatus, Status, WorkerStatus, forget_workers
from tests.test_lock_admin import SECRET as LOCK_SECRET
from tests.test_lock_admin import down_lock_backend
from tests.test_monitoring import SECRET, with_down_apps
from tests.testapp.monitoring_tasks import monitored_sleep

pytestmark = pytest.mark.django_db

WORKERS_URL = "admin:django_celery_adv_monitoring_changelist"
LOCKS_URL = "admin:django_celery_adv_monitoring_locks"
RELEASE_URL = "admin:django_celery_adv_monitoring_force_release"
EXPECTED_QUEUES = {"default": "celery", "global": "global", "twin": "twin"}


class Tables(HTMLParser):
    """table id -> rows of cell texts (th and td), enough to read our pages."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id"):
            self._table = attrs["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(autouse=True)
def fresh_state():
    forget_workers()
    lock_backends.reset()
    policies.invalidate()
    yield
    forget_workers()
    lock_backends.reset()


def make_user(username: str, *codenames: str, staff: bool = True) -> User:
    user = User.objects.create_user(username, password="pw", is_staff=staff)
    if codenames:
        user.user_permissions.add(*Permission.objects.filter(
            content_type__app_label="django_celery_adv", codename__in=codenames))
    return user


@pytest.fixture
def viewer(client):
    client.force_login(make_user("viewer", "view_monitoring"))
    return client


@pytest.fixture
def session_workers(default_worker, global_worker, twin_worker):
    return {"default": default_worker, "global": global_worker, "twin": twin_worker}


def page_urls() -> list[str]:
    return [reverse(WORKERS_URL), reverse(LOCKS_URL),
            reverse("admin:django_celery_adv_monitoring_worker", args=["default", "w@h"])]


# -- permissions -------------------------------------------------------------------

@pytest.mark.parametrize("index", range(3))
def test_permissions_on_every_page(client, index, monkeypatch):
    # The pages' content is not the point here: no broker round trips.
    monkeypatch.setattr(monitoring_admin, "inspect_all", lambda aliases=None: {
        alias: AppStatus(alias=alias, broker="memory://", reachable=True, error=None,
                         workers=[WorkerStatus(name="w@h", status=Status.ONLINE)])
        for alias in (aliases or settings.CELERY_ADV["APPS"])})
    monkeypatch.setattr(monitoring_admin, "read_worker", lambda alias, name, timeout=None: None)
    url = page_urls()[index]

    anonymous = client.get(url)
    assert anonymous.status_code == 302 and "/admin/login/" in anonymous["Location"]

    client.force_login(make_user("not-staff", "view_monitoring", staff=False))
    assert client.get(url).status_code == 302  # the admin wants staff first

    client.force_login(make_user("staff", "view_lockdefinition"))
    assert client.get(url).status_code == 403

    client.force_login(make_user("watcher", "view_monitoring"))
    assert client.get(url).status_code == 200

    client.force_login(User.objects.create_superuser("root", password="pw"))
    assert client.get(url).status_code == 200


def test_admin_index_lists_monitoring_only_for_those_allowed(client):
    client.force_login(make_user("watcher", "view_monitoring"))
    html = client.get(reverse("admin:index")).content.decode()
    assert "Celery monitoring" in html and reverse(WORKERS_URL) in html

    client.force_login(make_user("other", "view_lockdefinition"))
    html = client.get(reverse("admin:index")).content.decode()
    assert "Celery monitoring" not in html


def test_force_release_needs_post_csrf_and_its_permission():
    definition = LockDefinition.objects.create(name="mon-stuck", capacity=1)
    lease = lock_backends["default"].acquire("mon-stuck", 1, Holder(task_id="t-1"), 60)
    data = {"definition": definition.pk, "token": lease.token}
    url = reverse(RELEASE_URL)

    client = Client(enforce_csrf_checks=True)
    client.force_login(make_user("viewer", "view_monitoring"))
    assert client.get(url).status_code == 405
    page = client.get(reverse(LOCKS_URL)).content.decode()
    assert "Force release" not in page  # no button without the permission
    client.cookies["csrftoken"] = "x" * 32
    assert client.post(url, data, HTTP_X_CSRFTOKEN="x" * 32).status_code == 403
    assert len(lock_backends["default"].holders("mon-stuck")) == 1

    client.force_login(make_user("releaser", "view_monitoring", "force_release_lock"))
    assert client.post(url, data).status_code == 403  # no CSRF token
    page = client.get(reverse(LOCKS_URL)).content.decode()
    assert "Force release" in page
    token = client.cookies["csrftoken"].value
    response = client.post(url, {**data, "csrfmiddlewaretoken": token})

    assert response.status_code == 302 and response["Location"] == reverse(LOCKS_URL)
    assert lock_backends["default"].holders("mon-stuck") == []
    entry = LogEntry.objects.get(object_id=str(definition.pk))
    assert entry.user.username == "releaser" and str(lease.token) in entry.change_message


# -- the workers page against real workers --------------------------------------------

@pytest.mark.workers
def test_workers_page_lists_exactly_the_running_workers(viewer, session_workers):
    response = viewer.get(reverse(WORKERS_URL))

    assert response.status_code == 200
    html = response.content.decode()
    tables = Tables(html).tables
    summary = {row[0].split()[0]: row for row in tables["app-summary"][1:]}
    assert list(summary) == list(settings.CELERY_ADV["APPS"])
    header, *rows = tables["workers-table"]
    assert header == ["Name", "App", "Status", "Concurrency", "Processed tasks", "Queues",
                      "Succeeded / failed / retried (events)", "Load average"]
    assert len(rows) == len(session_workers)
    for alias, worker_process in session_workers.items():
        # default and twin share a Redis database, not their workers
        [row] = [row for row in rows if row[1] == alias]
        name, _app, status, concurrency, processed, queues, _events, _load = row
        assert (name, status, concurrency, queues) == (
            worker_process.name, "online", "2", EXPECTED_QUEUES[alias])
        assert processed.isdigit()
        assert summary[alias][1].startswith("Complete") and summary[alias][2] == "1"
        assert summary[alias][-1] == "OK"
    assert f"amqp://guest:{MASK}@" in html and ":guest@" not in html
    assert 'http-equiv="refresh"' not in html


@pytest.mark.workers
def test_meta_refresh_is_opt_in_and_bounded(viewer, session_workers):
    html = viewer.get(reverse(WORKERS_URL), {"refresh": "1"}).content.decode()
    assert '<meta http-equiv="refresh" content="2">' in html
    html = viewer.get(reverse(WORKERS_URL), {"refresh": "nonsense"}).content.decode()
    assert 'http-equiv="refresh"' not in html


@pytest.mark.workers
def test_an_unreachable_app_shows_its_error_in_place(viewer, session_workers):
    with with_down_apps():
        started = time.monotonic()
        response = viewer.get(reverse(WORKERS_URL))
        elapsed = time.monotonic() - started

    assert response.status_code == 200
    assert elapsed <= settings.CELERY_ADV.get("INSPECT_TIMEOUT", 1.0) + 1.5
    html = response.content.decode()
    assert SECRET not in html
    tables = Tables(html).tables
    for alias in ("down_redis", "down_amqp"):
        assert not [row for row in tables["workers-table"][1:] if row[1:2] == [alias]]
        section = html[html.index(f'id="app-{alias}"'):]
        section = section[:section.index("</tr>")]
        assert "Broker unreachable: OperationalError" in section
        assert f":{MASK}@127.0.0.1" in section
        assert "unreachable" in section[section.index('class="dca-health"'):]
    [default_row] = [row for row in tables["workers-table"][1:] if row[1] == "default"]
    assert default_row[2] == "online"


@pytest.mark.workers
def test_worker_detail_shows_the_running_task(viewer, default_worker):
    url = reverse("admin:django_celery_adv_monitoring_worker",
                  args=["default", default_worker.name])
    result = monitored_sleep.apply_async(args=[3], kwargs={"token": SECRET})
    deadline = time.monotonic() + 15
    html = ""
    while time.monotonic() < deadline and result.id not in html:
        html = viewer.get(url).content.decode()

    tables = Tables(html).tables
    [task_row] = [row for row in tables["active-tasks"] if row[0] == result.id]
    assert task_row[1] == "testapp.monitored_sleep"
    assert SECRET not in html and MASK in task_row[3]
    facts = dict(tables["worker-facts"])
    assert facts["Pool"] == "prefork" and facts["Queues"] == "celery"
    assert facts["Concurrency"] == "2" and facts["Running tasks"] == "1"
    assert facts["Status"] == "online" and "(since " in facts["Uptime"]
    result.get(timeout=30)


@pytest.mark.workers
def test_worker_detail_of_an_unknown_worker_is_404(viewer, default_worker):
    url = reverse("admin:django_celery_adv_monitoring_worker", args=["default", "nobody@nowhere"])
    assert viewer.get(url).status_code == 404
    url = reverse("admin:django_celery_adv_monitoring_worker", args=["nope", "nobody@nowhere"])
    assert viewer.get(url).status_code == 404


def fake_reading(count: int):
    def inspect_all(aliases=None):
        return {alias: AppStatus(alias=alias, broker="redis://h/0", reachable=True,
                                 error=None, commands=["stats", "active_queues"], workers=[
                                     WorkerStatus(name=f"{alias}-{i}@h{i % 7}",
                                                  status=Status.ONLINE if i % 10 else
                                                  Status.NO_REPLY, concurrency=4, processed=i,
                                                  queues=[alias, f"q{i % 3}"])
                                     for i in range(count)])
                for alias in ("a", "b", "c")}
    return inspect_all


def test_workers_page_queries_do_not_grow_with_workers(viewer, monkeypatch):
    counts = {}
    for workers in (1, 30, 2000):
        monkeypatch.setattr(monitoring_admin, "inspect_all", fake_reading(workers))
        with CaptureQueriesContext(connection) as queries:
            html = viewer.get(reverse(WORKERS_URL)).content.decode()
        # One page of rows at most, whatever the fleet.
        assert html.count('class="dca-worker ') == min(3 * workers, 100)
        counts[workers] = len(queries)

    assert counts[1] == counts[30] == counts[2000]


def test_workers_page_shows_what_the_event_recorder_counted(viewer, monkeypatch):
    """Flower's split (succeeded / failed / retried, load average) from the recorder's
    row, read in one query; a worker the recorder never saw shows "-"."""
    monkeypatch.setattr(monitoring_admin, "inspect_all", fake_reading(3))
    TaskRecorderStats.objects.create(app_alias="a", workers={"a-1@h1": {
        "processed": 12, "succeeded": 9, "failed": 2, "retried": 1,
        "loadavg": [0.5, 0.25, 0.1]}})
    html = viewer.get(reverse(WORKERS_URL)).content.decode()
    rows = {row[0]: row for row in Tables(html).tables["workers-table"][1:]}
    assert rows["a-1@h1"][-2:] == ["9 / 2 / 1", "0.5, 0.25, 0.1"]
    assert rows["a-2@h2"][-2:] == ["-", "-"] and rows["b-1@h1"][-2:] == ["-", "-"]


def test_workers_page_summary_first_then_filters_and_pages(viewer, monkeypatch):
    monkeypatch.setattr(monitoring_admin, "inspect_all", fake_reading(2000))
    started = time.monotonic()
    html = viewer.get(reverse(WORKERS_URL)).content.decode()
    first_page = time.monotonic() - started
    tables = Tables(html).tables
    summary = {row[0].split()[0]: row for row in tables["app-summary"][1:]}
    # Counts per status, per app, before any row: online, no reply, offline, unknown.
    assert summary["a"][2:6] == ["1800", "200", "0", "0"]
    assert html.index('id="app-summary"') < html.index('id="workers-table"')
    assert "6000 workers" in html and "page 1 of 60" in html
    assert first_page < 2.0  # generous: a loaded 2-core machine; the bench measures it

    def rows(**query):
        page = Tables(viewer.get(reverse(WORKERS_URL), query).content.decode())
        return page.tables["workers-table"][1:]

    assert {row[1] for row in rows(app="b")} == {"b"}
    assert {row[2] for row in rows(state="no reply")} == {"no reply"}
    assert all("q1" in row[5] for row in rows(queue="q1", app="c"))
    assert {row[0].rpartition("@")[2] for row in rows(host="@h3")} == {"h3"}
    assert rows(host="nomatch") == [["No worker matches these filters."]]
    last = rows(page="60")
    assert len(last) == 100 and last[-1][0] == "c-1999@h4"  # apps in order, then the reading's
    assert rows(page="999") == last  # out of range: the last page, not an error


# -- lock holders -----------------------------------------------------------------------

def test_lock_holders_page_reads_every_backend_and_survives_one_down(viewer):
    with down_lock_backend() as down:
        LockDefinition.objects.create(name="mon-held", capacity=3)
        LockDefinition.objects.create(name="mon-free", capacity=2)
        LockDefinition.objects.create(name="mon-redis", backend="redis", capacity=1)
        LockDefinition.objects.create(name="mon-down-1", backend="down", capacity=1)
        LockDefinition.objects.create(name="mon-down-2", backend="down", capacity=1)
        leases = [lock_backends["default"].acquire("mon-held", 3, Holder(task_id=f"task-{i}"), 60)
                  for i in range(2)]
        redis_lease = lock_backends["redis"].acquire("mon-redis", 1, Holder(task_id="r-1"), 60)
        try:
            response = viewer.get(reverse(LOCKS_URL))
        finally:
            lock_backends["redis"].release(redis_lease)

    assert response.status_code == 200
    html = response.content.decode()
    assert LOCK_SECRET not in html
    # A lock with holders: its first row has 8 cells (lock, backend, count,
    # then the holder), further holders 5; a lock without holders has 4.
    rows = Tables(html).tables["lock-holders"][1:]
    first_rows = {row[0]: row for row in rows if len(row) == 8}
    other_rows = [row for row in rows if len(row) == 5]
    plain = {row[0]: row for row in rows if len(row) == 4}
    assert first_rows["mon-held"][1:3] == ["default: database 'default'", "2 / 3"]
    held_by = {first_rows["mon-held"][3]: first_rows["mon-held"][-1]}
    held_by.update({row[0]: row[-1] for row in other_rows})
    assert held_by == {lease.holder.task_id: str(lease.token) for lease in leases}
    holder = leases[0].holder
    assert first_rows["mon-held"][4] == f"{holder.hostname} (pid {holder.pid})"
    assert first_rows["mon-redis"][1].startswith("redis: redis ")
    assert first_rows["mon-redis"][2:4] == ["1 / 1", "r-1"]
    assert plain["mon-free"][2:] == ["2", "nobody"]
    for name in ("mon-down-1", "mon-down-2"):
        assert plain[name][3].startswith("Backend unavailable: "), plain[name]
    assert f"redis://:{MASK}@127.0.0.1:{down.port}" in html  # the backend, described masked
    assert down.holders_calls == 1, "a down backend is asked once, not once per lock"


def test_force_release_on_a_backend_that_is_down_is_a_message(client):
    client.force_login(make_user("releaser", "view_monitoring", "force_release_lock"))
    with down_lock_backend():
        definition = LockDefinition.objects.create(name="mon-unreachable", backend="down")
        response = client.post(reverse(RELEASE_URL), {"definition": definition.pk, "token": 7})
        page = client.get(reverse(LOCKS_URL))

    assert response.status_code == 302 and response["Location"] == reverse(LOCKS_URL)
    [message] = [str(message) for message in page.context["messages"]]
    assert message.startswith("mon-unreachable: ") and "Connection refused" in message
    assert LOCK_SECRET not in message and "down" in message
    assert not LogEntry.objects.exists()
