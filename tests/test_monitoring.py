"""inspect_all() against real workers on Redis and RabbitMQ, and the masking helpers.

The seen-workers record is in the database, so every test here may touch it.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import datetime

import pytest
from django.conf import settings
from django.test import override_settings

from django_celery_adv import monitoring
from django_celery_adv.masking import MASK, mask_secrets, mask_text, mask_url, url_secrets
from django_celery_adv.monitoring import AppStatus, Status, forget_workers, inspect_all, mark_seen
from tests.testapp.monitoring_tasks import monitored_sleep

SECRET = "secretpw"

pytestmark = pytest.mark.django_db


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_down_apps(**extra_apps: dict) -> override_settings:
    """The test settings plus apps whose brokers refuse connections."""
    port = closed_port()
    down = {
        "down_redis": {"broker_url": f"redis://:{SECRET}@127.0.0.1:{port}/0"},
        "down_amqp": {"broker_url": f"amqp://u:{SECRET}@127.0.0.1:{port}//"},
        **extra_apps,
    }
    return override_settings(CELERY_ADV={**settings.CELERY_ADV,
                                         "APPS": {**settings.CELERY_ADV["APPS"], **down}})


@pytest.fixture(autouse=True)
def fresh_record():
    """Each test starts without a last-seen record (workers of other tests come and go)."""
    forget_workers()
    yield
    forget_workers()


@pytest.fixture
def session_workers(default_worker, global_worker, twin_worker):
    return {"default": default_worker, "global": global_worker, "twin": twin_worker}


# -- masking ------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "masked"), [
    ("redis://:secretpw@127.0.0.1:6379/0", f"redis://:{MASK}@127.0.0.1:6379/0"),
    ("amqp://user:secretpw@rabbit:5672/vhost", f"amqp://user:{MASK}@rabbit:5672/vhost"),
    ("amqp://user@rabbit//", "amqp://user@rabbit//"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("amqp://a:secretpw@h1//;amqp://b:secretpw@h2//", f"amqp://a:{MASK}@h1//;amqp://b:{MASK}@h2//"),
    ("mongodb://h/db?authSource=admin&password=secretpw",
     f"mongodb://h/db?authSource=admin&password={MASK}"),
    ("sentinel://:secretpw@s1:26379;sentinel://:secretpw@s2:26379",
     f"sentinel://:{MASK}@s1:26379;sentinel://:{MASK}@s2:26379"),
])
def test_mask_url_hides_passwords_and_keeps_the_rest(url, masked):
    assert mask_url(url) == masked
    assert SECRET not in mask_url(url)


def test_mask_url_accepts_lists_and_none():
    assert mask_url(["redis://:secretpw@a/0", "redis://b/0"]) == f"redis://:{MASK}@a/0;redis://b/0"
    assert mask_url(None) == ""
    assert url_secrets("amqp://u:secretpw@h//;redis://:other@h/0") == ["secretpw", "other"]


@pytest.mark.parametrize("text", [
    "Error connecting to redis://:secretpw@10.0.0.1:6379/0: refused",
    "kwargs={'password': 'secretpw', 'n': 1}",
    '{"api_key": "secretpw"}',
    "login failed for token=secretpw&user=x",
    "AUTH secretpw rejected",  # a bare password the caller names
])
def test_mask_text_hides_every_shape_of_secret(text):
    masked = mask_text(text, secrets=[SECRET])
    assert SECRET not in masked
    assert MASK in masked


def test_mask_text_leaves_ordinary_text_alone():
    text = "Error 111 connecting to 127.0.0.1:1. Connection refused."
    assert mask_text(text, secrets=["pw"]) == text  # too short to search for literally


def test_mask_secrets_copies_nested_structures():
    data = {"user": "bob", "Password": 123, "nested": [{"db_url": "redis://:secretpw@h/0"},
                                                     ("x", {"client_secret": "s"})]}
    masked = mask_secrets(data)

    assert masked == {"user": "bob", "Password": MASK, "nested": [
        {"db_url": f"redis://:{MASK}@h/0"}, ("x", {"client_secret": MASK})]}
    assert data["Password"] == 123  # the input is untouched


# -- reading real workers ---------------------------------------------------------------

def test_lists_exactly_the_running_workers_of_each_app(session_workers):
    statuses = inspect_all()

    assert list(statuses) == list(settings.CELERY_ADV["APPS"])
    expected_queues = {"default": ["celery"], "global": ["global"], "twin": ["twin"]}
    for alias, worker_process in session_workers.items():
        status = statuses[alias]
        assert status.reachable and status.error is None, status.error
        # Two apps on one Redis database (default, twin) never list each other's worker.
        assert [worker.name for worker in status.workers] == [worker_process.name]
        [worker] = status.workers
        # Liveness from stats: no ping round unless asked for.
        assert worker.status == Status.ONLINE and worker.ping is None and worker.unread == []
        assert worker.concurrency == 2
        assert worker.queues == expected_queues[alias]
        assert worker.pool == "prefork"
        assert worker.prefetch == 2  # concurrency x worker_prefetch_multiplier=1
        # The table reading does not ask for task lists ("active"): not "0", unknown.
        assert worker.running is None and worker.active is None and worker.completed is None
        assert not worker.not_read("running") and worker.not_asked("running", status.commands)
        assert isinstance(worker.processed, int) and worker.uptime >= 0  # whole seconds: 0 at first
        assert isinstance(worker.pid, int)
        assert not status.partial and status.unread == 0 and status.missing == 0
    # RabbitMQ's URL carries the password "guest": shown masked.
    assert ":guest@" not in statuses["global"].broker and MASK in statuses["global"].broker


def test_apps_are_read_concurrently_and_known_workers_end_a_reading_early(session_workers):
    timeout = 1.5
    started = time.monotonic()
    inspect_all(timeout=timeout, max_age=0)  # discovery: nothing known, waits the timeout
    discovery = time.monotonic() - started
    # Three apps each waiting the timeout: concurrent means ~1x, not 3x (4.5 s).
    assert timeout <= discovery < 2 * timeout, discovery

    timings = []
    for _ in range(5):
        started = time.monotonic()
        statuses = inspect_all(timeout=timeout, max_age=0)
        timings.append(time.monotonic() - started)
        assert all(len(status.online) == 1 for status in statuses.values())
    # Every known worker answered: no reading waited for its timeout (the
    # median well below it, so that a loaded moment does not decide).
    assert sorted(timings)[2] < timeout / 2, timings
    assert max(timings) < timeout, timings


@pytest.mark.parametrize("reader", ["full reading", "read_worker"])
def test_a_running_task_is_listed_with_masked_arguments(default_worker, reader):
    def read():
        if reader == "read_worker":
            return monitoring.read_worker("default", default_worker.name)
        return inspect_all(["default"], max_age=0, commands=monitoring.FULL_COMMANDS)[
            "default"].worker(default_worker.name)

    result = monitored_sleep.apply_async(
        args=[4], kwargs={"password": SECRET, "dsn": f"redis://:{SECRET}@db:6379/0", "n": 7})
    deadline = time.monotonic() + 15
    task = worker = None
    while time.monotonic() < deadline and task is None:
        worker = read()
        task = next((t for t in worker.active or [] if t.id == result.id), None)
    assert task is not None, "the task never showed up under active"

    assert worker.running >= 1
    assert task.name == "testapp.monitored_sleep"
    assert task.args == "[4]" or task.args == "(4,)"
    assert SECRET not in task.kwargs and "'n': 7" in task.kwargs and MASK in task.kwargs
    assert isinstance(task.worker_pid, int) and task.worker_pid != worker.pid
    assert isinstance(task.started, datetime) and 0 <= task.runtime < 15

    completed_before = worker.completed
    result.get(timeout=30)
    after = read()
    assert all(t.id != result.id for t in after.active)
    assert after.completed >= completed_before + 1


def test_a_down_broker_is_unreachable_within_the_timeout_and_hides_its_password(
        session_workers):
    timeout = 1.0
    with with_down_apps():
        started = time.monotonic()
        statuses = inspect_all(timeout=timeout)
        elapsed = time.monotonic() - started

    assert elapsed <= timeout + 2  # a broker's connection retries would take far longer
    for alias in ("down_redis", "down_amqp"):
        status = statuses[alias]
        assert status.reachable is False and status.workers == []
        assert "refused" in status.error.lower(), status.error
        assert SECRET not in status.error and SECRET not in status.broker
        assert MASK in status.broker
        assert not status.healthy
    # The other apps are unaffected.
    assert all(statuses[alias].healthy for alias in session_workers)


def test_a_stalled_broker_is_abandoned_not_waited_for(session_workers):
    """A server that accepts connections and never answers: no hang, an error."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    port = listener.getsockname()[1]
    try:
        with with_down_apps(stalled_redis={"broker_url": f"redis://:{SECRET}@127.0.0.1:{port}/0"},
                            stalled_amqp={"broker_url": f"amqp://u:{SECRET}@127.0.0.1:{port}//"}):
            started = time.monotonic()
            statuses = inspect_all(["default", "stalled_redis", "stalled_amqp"], timeout=1.0)
            elapsed = time.monotonic() - started
        # The reading threads end on their own socket timeouts while the server
        # still stalls: nothing hangs on after inspect_all() gave up.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _reading_threads("stalled"):
            time.sleep(0.1)
        left_over = _reading_threads("stalled")
    finally:
        listener.close()
        for conn in accepted:
            conn.close()

    assert elapsed <= 2.0
    assert not left_over
    assert statuses["default"].healthy
    for alias in ("stalled_redis", "stalled_amqp"):
        assert statuses[alias].reachable is False
        assert statuses[alias].error and SECRET not in statuses[alias].error


def _reading_threads(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(f"inspect-{prefix}")]


def test_silent_known_workers_are_unknown_not_down(default_worker):
    now = time.time()
    offline_after = monitoring.shared.conf.monitoring("OFFLINE_AFTER")
    forget_after = monitoring.shared.conf.monitoring("FORGET_AFTER")
    mark_seen("default", "ghost@nowhere", now - 5)  # e.g. a heartbeat, 5 s ago
    mark_seen("default", "old@nowhere", now - 2 * offline_after)
    mark_seen("default", "gone@nowhere", now - 2 * forget_after)

    status = inspect_all(["default"], timeout=0.5, max_age=0)["default"]

    by_name = {worker.name: worker for worker in status.workers}
    assert set(by_name) == {default_worker.name, "ghost@nowhere", "old@nowhere"}
    assert by_name[default_worker.name].status == Status.ONLINE
    ghost = by_name["ghost@nowhere"]
    assert ghost.status == Status.NO_REPLY
    assert (ghost.concurrency, ghost.completed, ghost.running, ghost.queues) == (None,) * 4
    assert ghost.values_at is None  # never read: nothing to show, not "0"
    assert by_name["old@nowhere"].status == Status.OFFLINE
    # The ghost, believed alive, sent nothing: the reading says so (it was not
    # waited for: it did not answer the last reading). The old one is offline.
    assert status.partial and status.missing == 1 and set(status.unread_by) == {"ghost@nowhere"}
    assert status.problem(window=60) is None  # seen 5 s ago: tolerated
    assert status.problem(window=1).startswith("partial reading")

    with with_down_apps():
        mark_seen("down_redis", "ghost@nowhere", now)
        down = inspect_all(["down_redis"], timeout=0.5, max_age=0)["down_redis"]
    assert [(w.name, w.status) for w in down.workers] == [("ghost@nowhere", Status.UNKNOWN)]


def test_a_worker_that_stops_answering_keeps_its_last_values(default_worker):
    """The record says which workers answered the last reading; one of them
    silent now is waited for, counted as missing, and keeps its values."""
    first = inspect_all(["default"], max_age=0)["default"]
    real = first.worker(default_worker.name)
    # Impersonate a second worker of that reading: same values, another name.
    from django_celery_adv.models import SeenWorker
    row = SeenWorker.objects.get(app_alias="default", hostname=default_worker.name)
    SeenWorker.objects.create(app_alias="default", hostname="busy@nowhere",
                              last_seen=row.last_seen, values_at=row.values_at,
                              values=row.values)

    started = time.monotonic()
    status = inspect_all(["default"], timeout=0.6, max_age=0)["default"]
    elapsed = time.monotonic() - started

    assert elapsed >= 0.6  # the silent expected worker was waited for
    busy = status.worker("busy@nowhere")
    assert busy.status == Status.NO_REPLY
    assert busy.concurrency == real.concurrency == 2 and busy.queues == ["celery"]
    assert busy.values_at == first.read_at < status.read_at  # marked with its age
    assert set(busy.unread) == set(monitoring.COMMANDS) and busy.not_read("concurrency")
    assert monitoring.read_worker("default", "busy@nowhere", timeout=0.3) is None
    assert status.partial and status.missing == 1 and status.unread == len(monitoring.COMMANDS)
    assert status.unread_by == {"busy@nowhere": sorted(monitoring.COMMANDS, key=list(
        monitoring.COMMANDS).index)}
    # Seen within the window: tolerated; not if the window is shorter than its silence.
    assert status.problem(window=60) is None
    assert status.problem(window=0).startswith("partial reading: 2 replies not read")
    assert status.problem(window=0, allow_partial=True) is None

    # The next reading no longer waits for it (it did not answer the last one).
    started = time.monotonic()
    again = inspect_all(["default"], timeout=3.0, max_age=0)["default"]
    assert time.monotonic() - started < 2.0  # waiting for it would take the 3 s
    assert again.worker("busy@nowhere").concurrency == 2
    assert again.partial and again.missing == 1  # but it is still not read


def test_as_dict_is_json_ready(default_worker):
    import json

    data = inspect_all(["default"])["default"].as_dict()
    assert data["partial"] is False and data["unread"] == 0

    assert json.loads(json.dumps(data))["workers"][0]["name"] == default_worker.name
    assert data["workers"][0]["status"] == "online"
    assert isinstance(data["read_at"], str)


def test_redis_reply_batches_come_oldest_first_on_new_and_old_servers():
    """RPOP key COUNT (Redis >= 6.2) and its LRANGE + LTRIM stand-in agree."""
    import redis

    from django_celery_adv.monitoring.collect import REDIS_BATCH, pop_batch, pop_batch_old

    client = redis.Redis.from_url(settings.REDIS_URL)
    key = f"dca-test-replies-{time.monotonic_ns()}"
    try:
        for pop in (pop_batch, pop_batch_old):
            client.lpush(key, *[str(i) for i in range(REDIS_BATCH + 20)])  # 0 is the oldest
            first, second = pop(client, key), pop(client, key)
            assert [int(x) for x in first] == list(range(REDIS_BATCH))
            assert [int(x) for x in second] == list(range(REDIS_BATCH, REDIS_BATCH + 20))
            assert not pop(client, key) and client.llen(key) == 0
    finally:
        client.delete(key)


def test_a_waiter_asking_for_more_commands_does_not_take_a_narrower_reading(
        default_worker, monkeypatch):
    """``celery_status active`` waiting on another process's claim must not use that
    process's table reading (no ``active``): it reads the running tasks itself."""
    from datetime import UTC, timedelta

    from django_celery_adv.models import AppReading
    from django_celery_adv.monitoring import FULL_COMMANDS
    from django_celery_adv.monitoring import record as store

    inspect_all(["default"], timeout=0.5, max_age=0)  # a table reading (no "active")
    AppReading.objects.filter(app_alias="default").update(
        reader="other", reader_until=datetime.now(UTC) + timedelta(seconds=60))
    polled = store.reading_state

    def claimer_stores_its_table_reading(alias):
        # The other process stores its (table) reading and releases its claim.
        AppReading.objects.filter(app_alias=alias).update(
            read_at=datetime.now(UTC), reader="", reader_until=None)
        return polled(alias)

    monkeypatch.setattr(store, "reading_state", claimer_stores_its_table_reading)
    status = inspect_all(["default"], timeout=1.0, commands=FULL_COMMANDS)["default"]

    assert "active" in status.commands, status.commands
    worker = status.worker(default_worker.name)
    assert worker is not None and worker.online and worker.active is not None


def test_a_claim_that_expired_is_taken_over_by_one_waiter_only(default_worker, monkeypatch):
    """Waiters that see the claim expire race for it: the loser keeps waiting for the
    winner's reading instead of broadcasting too."""
    from datetime import UTC, timedelta

    from django_celery_adv.models import AppReading
    from django_celery_adv.monitoring import record as store

    first = inspect_all(["default"], timeout=0.5, max_age=0)["default"]
    AppReading.objects.filter(app_alias="default").update(
        reader="other", reader_until=datetime.now(UTC) + timedelta(seconds=60))
    # What we polled says "expired"; by the time we claim, another waiter has it.
    monkeypatch.setattr(store, "reading_state", lambda alias: (
        first.read_at, datetime.now(UTC) - timedelta(seconds=1)))
    broadcasts = []
    collect = monitoring.shared.collect
    monkeypatch.setattr(monitoring.shared, "collect",
                        lambda *args, **kwargs: broadcasts.append(1) or collect(*args, **kwargs))

    status = inspect_all(["default"], timeout=0.3, max_age=0)["default"]

    assert broadcasts == []
    assert not status.reachable and "another process" in status.error


@pytest.mark.django_db
def test_storing_a_reading_leaves_a_claim_that_another_process_took_since():
    """The claimer of an expired claim stores late: the claim another process took
    meanwhile stays that process's (else a third would broadcast too)."""
    from django.utils import timezone

    from django_celery_adv.models import AppReading
    from django_celery_adv.monitoring import record as store

    assert store.claim("default", "late", 0.01)
    time.sleep(0.05)  # the late claimer's claim expires ...
    assert store.claim("default", "other", 30)  # ... and another process takes it
    store.save(AppStatus(alias="default", broker="redis://h/0", reachable=True, error=None,
                         commands=["stats"]), None, "late")
    row = AppReading.objects.get(app_alias="default")
    assert row.reader == "other" and row.reader_until > timezone.now()
    store.save(AppStatus(alias="default", broker="redis://h/0", reachable=True, error=None,
                         commands=["stats"]), None, "other")
    row.refresh_from_db()
    assert (row.reader, row.reader_until) == ("", None)  # its own claim is released


@pytest.mark.django_db
def test_a_start_time_moved_by_reply_timing_is_not_a_change():
    """A worker's start time is the reading's end minus the whole seconds of ``uptime``
    it sent: two readings of a worker that did not restart can put it 2 s apart, more
    when replies come early in a long reading. Such a worker is stored like an
    unchanged one (times moved in one UPDATE, values kept), not rewritten; before,
    on a loaded machine part of an idle fleet was rewritten each reading."""
    from datetime import UTC, timedelta

    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from django_celery_adv.models import SeenWorker
    from django_celery_adv.monitoring import WorkerStatus
    from django_celery_adv.monitoring import record as store

    def reading(at, duration, uptimes):
        status = AppStatus(alias="default", broker="redis://h/0", reachable=True, error=None,
                           commands=["stats"], read_at=at, duration=duration)
        status.workers = [WorkerStatus(name=name, status=Status.ONLINE, concurrency=2, pid=7,
                                       uptime=uptime, last_seen=at, values_at=at)
                          for name, uptime in uptimes.items()]
        return status

    first_at = datetime.now(UTC).replace(microsecond=900000) - timedelta(seconds=10)
    store.save(reading(first_at, 0.1, {"a@h": 100, "b@h": 100}))
    started = {row.hostname: row.values["started"] for row in SeenWorker.objects.all()}
    # 1.7 s later: "a" sent its uptime early in a 1.2 s reading, "b" at its end.
    second_at = first_at + timedelta(seconds=1.7)
    with CaptureQueriesContext(connection) as queries:
        store.save(reading(second_at, 1.2, {"a@h": 100, "b@h": 101}), store.load("default"))

    assert [row.values["started"] - started[row.hostname]  # 2 s apart, and kept
            for row in SeenWorker.objects.order_by("hostname")] == [0, 0]
    assert set(SeenWorker.objects.values_list("values_at", flat=True)) == {second_at}
    assert not [query for query in queries.captured_queries
                if query["sql"].lstrip().upper().startswith("INSERT")], "rewritten"
