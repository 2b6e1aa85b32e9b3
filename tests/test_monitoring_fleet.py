"""Fleet-scale readings against the simulated fleet (bench/fleet.py) and busy real workers.

Issue 14: every worker of 500 complete in every reading, on Redis and on
RabbitMQ; replies delayed past the timeout make the reading ``partial`` and
``celery_status`` exit 1 (0 with ``--allow-partial``); two apps of 300 on one
Redis database never list each other's workers. Issue 10: a busy worker keeps
its last values and its page, and the exit code tolerates it within the
silent window; a fresh process reads the seen-workers record from the
database instead of waiting the whole timeout.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from django_celery_adv import monitoring
from django_celery_adv.models import AppReading, SeenWorker
from django_celery_adv.monitoring import Status, forget_workers, inspect_all, mark_seen
from tests.fleet import started_fleets
from tests.test_celery_status import run, run_cli
from tests.test_monitoring_admin import Tables, make_user
from tests.testapp.monitoring_tasks import monitored_sleep
from tests.workers import WorkerProcess

pytestmark = pytest.mark.django_db


@pytest.fixture
def fleets():
    with started_fleets() as start:
        yield start


@pytest.fixture(autouse=True)
def fresh_record():
    forget_workers()
    yield
    forget_workers()


def monitoring_settings(**values) -> override_settings:
    return override_settings(CELERY_ADV={**settings.CELERY_ADV, "MONITORING": values})


@pytest.mark.parametrize("alias", ["default", "global"])  # Redis, RabbitMQ
def test_every_one_of_500_workers_is_complete_in_every_reading(fleets, alias):
    fleet = fleets(alias, 500, latency="lognormal:0.003,0.6", prefix=f"full-{alias}")
    names = set(fleet.hostnames)

    first = inspect_all([alias], timeout=2.0, max_age=0)[alias]  # discovery: waits 2 s
    # (The session's real worker of the app may be there too.)
    assert names <= {worker.name for worker in first.online}
    durations = []
    for _ in range(5):
        status = inspect_all([alias], timeout=2.0, max_age=0)[alias]
        durations.append(status.duration)
        assert not status.partial and status.unread == 0 and status.missing == 0
        complete = [worker for worker in status.online
                    if not worker.unread and worker.concurrency == 2 and worker.queues]
        assert names <= {worker.name for worker in complete}
    # Known workers end the reading long before its timeout.
    assert sorted(durations)[2] < 1.5, durations


def test_2000_workers_complete_in_every_reading(fleets):
    """Fails on the collector before issue 14 (quadratic completeness test, one BRPOP per
    reply): its three readings had 2000, 1067 and 2000 of 2000 workers complete."""
    fleet = fleets("default", 2000, latency="lognormal:0.003,0.6", prefix="big")
    names = set(fleet.hostnames)
    inspect_all(["default"], timeout=2.0, max_age=0)
    for _ in range(3):
        status = inspect_all(["default"], timeout=2.0, max_age=0)["default"]
        assert not status.partial
        assert names <= {w.name for w in status.online if w.concurrency == 2 and w.queues}


def test_replies_delayed_past_the_timeout_make_a_partial_reading(fleets):
    fleet = fleets("default", 300, latency="const:0.002", slow=30, slow_latency=1.2,
                   prefix="delayed")
    slow = set(fleet.hostnames[:30])
    # A reading long enough for the slow ones too (1.2 s, and a simulator running
    # late on a loaded machine): all 300 are in the record.
    first = inspect_all(["default"], timeout=2.5, max_age=0)["default"]
    assert set(fleet.hostnames) <= {worker.name for worker in first.online}

    status = inspect_all(["default"], timeout=0.5, max_age=0)["default"]

    assert status.partial and status.missing == 30 and status.unread == 60
    assert set(status.unread_by) == slow
    for worker in status.workers:
        if worker.name in slow:  # silent now: last values kept, marked as not read now
            assert worker.status == Status.NO_REPLY and worker.concurrency == 2
            assert worker.values_at < status.read_at and worker.not_read("queues")
        else:
            assert worker.online and not worker.unread
    assert status.problem(window=0) == "partial reading: 60 replies not read"

    # The command: not healthy; healthy with --allow-partial; the text says why.
    with monitoring_settings(SILENT_WINDOW=0):
        code, out, err = run("--app", "default", "--timeout", "0.5", "--fresh")
        assert code == 1 and "default (partial reading: 60 replies not read)" in err
        assert "PARTIAL: 60 replies not read in time; 30 expected workers sent nothing." in out
        json_code, json_out, _ = run("--app", "default", "--timeout", "0.5", "--json")
        assert json_code == 1 and '"partial": true' in json_out and '"unread": 60' in json_out
        code, out, _ = run("--app", "default", "--timeout", "0.5", "--allow-partial")
        assert code == 0 and "PARTIAL" in out
    # Within the silent window (default 60 s) silent workers are tolerated, but shown.
    code, out, _ = run("--app", "default", "--timeout", "0.5", "--fresh")
    assert code == 0 and "PARTIAL" in out and "no reply (last seen" in out


def test_two_apps_of_300_on_one_redis_database_never_list_each_others_workers(fleets):
    # "default" and "twin" share a Redis database; each has its own control exchange.
    mine = fleets("default", 300, prefix="mine")
    theirs = fleets("twin", 300, prefix="theirs")

    for timeout in (1.0, 1.0, 1.0):  # discovery, then with the record
        statuses = inspect_all(["default", "twin"], timeout=timeout, max_age=0)
        # Exactly the fleet (and the session's real worker of the app, if it runs).
        simulated = {"default": set(), "twin": set()}
        for alias in simulated:
            simulated[alias] = {w.name for w in statuses[alias].workers
                                if w.name.startswith(("mine-", "theirs-"))}
        assert simulated == {"default": set(mine.hostnames), "twin": set(theirs.hostnames)}
        assert not statuses["default"].partial and not statuses["twin"].partial


def test_one_reading_is_shared_and_one_process_reads_at_a_time(fleets):
    fleets("default", 100, prefix="shared")
    first = inspect_all(["default"], timeout=1.0, max_age=0)["default"]
    again = inspect_all(["default"], timeout=1.0, max_age=30)["default"]
    assert again.shared and again.read_at == first.read_at
    assert {w.name for w in again.online} == {w.name for w in first.online}
    assert monitoring.last_reading("default").read_at == first.read_at  # no broadcast

    # Another process holds the reader claim: we wait for its reading, then use it.
    AppReading.objects.filter(app_alias="default").update(
        reader="other", reader_until=first.read_at + timedelta(seconds=60))
    started = time.monotonic()
    waited = inspect_all(["default"], timeout=0.4, max_age=0)["default"]
    assert time.monotonic() - started >= 0.4  # it did not broadcast itself...
    assert waited.shared is False and not waited.reachable  # ...nor got a reading
    assert "no answer" in waited.error
    AppReading.objects.filter(app_alias="default").update(reader="", reader_until=None)
    assert inspect_all(["default"], timeout=1.0, max_age=0)["default"].online


def test_storing_a_reading_of_an_idle_fleet_takes_the_same_queries_at_any_size(fleets):
    # An app of its own on the test Redis: no real worker of the session answers there.
    alone = {**settings.CELERY_ADV, "APPS": {**settings.CELERY_ADV["APPS"],
                                             "idle_fleet": {"broker_url": settings.REDIS_URL}}}
    counts = {}
    with override_settings(CELERY_ADV=alone):
        for size in (50, 1000):
            forget_workers(["idle_fleet"])
            fleet = fleets("idle_fleet", size, prefix=f"idle{size}")
            inspect_all(["idle_fleet"], timeout=1.5, max_age=0)  # discovery
            # Idle means every worker's values are already stored: on a loaded
            # machine a reading may miss a late reply, and the next one stores it.
            for _ in range(5):
                if not inspect_all(["idle_fleet"], timeout=1.5, max_age=0)["idle_fleet"].partial:
                    break
            with CaptureQueriesContext(connection) as queries:
                status = inspect_all(["idle_fleet"], timeout=1.5, max_age=0)["idle_fleet"]
            assert not status.partial and len(status.online) == size
            counts[size] = len(queries)
            fleet.stop()
        forget_workers(["idle_fleet"])
    assert counts[50] == counts[1000], counts


@pytest.mark.django_db(transaction=True)  # the subprocess reads what this test stored
def test_a_fresh_process_knows_the_workers_from_the_database(fleets):
    fleet = fleets("default", 300, prefix="fresh")
    inspect_all(["default"], timeout=1.0, max_age=0)
    # Make the stored reading too old to be reused: the command must broadcast,
    # and it knows from the database which workers to wait for.
    AppReading.objects.filter(app_alias="default").update(
        read_at=AppReading.objects.get(app_alias="default").read_at - timedelta(seconds=30))
    SeenWorker.objects.filter(app_alias="default").update(
        values_at=AppReading.objects.get(app_alias="default").read_at)

    result = run_cli("--app", "default", "--timeout", "3")

    assert result.returncode == 0, result.stderr
    read_ms = int(re.search(r"\(read in (\d+) ms\)", result.stdout).group(1))
    assert read_ms < 1500, result.stdout[:300]  # not the 3 s a discovery reading waits
    assert all(f"-> {name}: OK" in result.stdout for name in fleet.hostnames)
    assert "PARTIAL" not in result.stdout


def test_a_heartbeat_counts_as_seen():
    mark_seen("default", "beating@h", time.time() - 2)
    mark_seen("default", "beating@h", time.time() - 100)  # never moves back in time
    [row] = SeenWorker.objects.filter(app_alias="default", hostname="beating@h")
    assert (monitoring.shared.datetime.now(monitoring.shared.UTC) - row.last_seen).seconds < 5
    assert monitoring.load_seen("default")["beating@h"] == row.last_seen.timestamp()


def test_heartbeats_of_a_thousand_workers_take_a_few_statements():
    now = time.time()
    beats = {f"hb-{i}@h": now - i % 7 for i in range(1000)}
    with CaptureQueriesContext(connection) as first:
        monitoring.mark_seen_many("default", beats)
    with CaptureQueriesContext(connection) as again:
        monitoring.mark_seen_many("default", {name: when + 1 for name, when in beats.items()})
    assert len(first) <= 12 and len(again) <= 12, (len(first), len(again))
    seen = monitoring.load_seen("default")
    assert len(seen) == 1000 and all(abs(seen[name] - (when + 1)) < 1e-3
                                     for name, when in beats.items())


@pytest.fixture
def busy_worker(django_db_blocker):
    """A solo-pool worker on its own queue: while it runs a task it answers nothing."""
    with django_db_blocker.unblock():
        worker = WorkerProcess("default", pool="solo", concurrency=1, tag="-busy",
                               extra_args=("-Q", "busy-monitoring")).start()
    yield worker
    worker.stop()


def test_a_busy_worker_keeps_its_values_and_its_page(busy_worker, client, default_worker):
    first = inspect_all(["default"], max_age=0)["default"]
    assert first.worker(busy_worker.name).online
    # Busy long enough for the readings, two commands and the page below, loaded or not.
    result = monitored_sleep.apply_async(args=[8], queue="busy-monitoring")
    deadline = time.monotonic() + 10
    status = first
    while time.monotonic() < deadline:  # until the task occupies it
        status = inspect_all(["default"], timeout=0.5, max_age=0)["default"]
        if not status.worker(busy_worker.name).online:
            break
    busy = status.worker(busy_worker.name)

    assert busy.status == Status.NO_REPLY  # not "offline", not gone
    assert busy.concurrency == 1 and busy.pool == "solo" and busy.values_at < status.read_at
    assert status.problem(window=60) is None  # the health check tolerates it...
    with monitoring_settings(SILENT_WINDOW=0):
        code, _, err = run("--app", "default", "--timeout", "0.5", "--fresh")
        assert code == 1 and "partial reading" in err  # ...within the window only
    code, out, _ = run("--app", "default", "--timeout", "0.5")
    assert code == 0 and f"-> {busy_worker.name}: no reply" in out

    client.force_login(make_user("watcher", "view_monitoring"))
    page = client.get(reverse("admin:django_celery_adv_monitoring_worker",
                              args=["default", busy_worker.name]))
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="worker-stale"' in html and "the values below are the last known ones" in html
    facts = dict(Tables(html).tables["worker-facts"])
    assert facts["Concurrency"] == "1" and facts["Pool"] == "solo"
    result.get(timeout=30)
