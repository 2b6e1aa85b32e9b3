"""``/metrics`` with 3 apps x 10 workers x 100 task names: server time and broadcasts.

Run from the repository root (``bash scripts/bench.sh`` runs it as ``bench.metrics_bench``)::

    .venv/bin/python -m bench.metrics_bench

What is there when the scrapes run:

* 30 real solo-pool worker processes (3 apps x 10, as ``bench.inspect_all``
  starts them), read once by ``inspect_all()`` so that the fleet record holds
  a stored reading of each app;
* per app: the recorder's counters for 100 task names x 4 states and a fresh
  heartbeat (active count) of each of its 10 workers (``TaskRecorderStats``);
  ``BENCH_METRICS_RECORDS`` stored task records (default 100,000 per app,
  over the 100 names, 1 % of them unfinished; ``BENCH_METRICS_RECENT``,
  default 3,000, finished within the histogram window, the rest over the
  week before); a beat leader row; 10 open failure groups;
* 20 lock definitions on the database lock backend, 10 of them held;
* the apps' queues on their real brokers (Redis and RabbitMQ), read at each
  scrape with ``METRICS["SERVER_TIMEOUT"]``.

Measured: the server time of ``GET /celery-adv/metrics`` with the bearer token
(Django's test client in process, ``BENCH_METRICS_ROUNDS`` requests, default
30), SQL queries per request, series in the page, and the control commands
sent during all of them (counted at kombu's ``Mailbox._publish``, which every
broadcast and inspect passes through). Side by side, what an inspect-based
exporter does per scrape (``inspect().stats()`` and ``inspect().active()`` per
app, celery-exporter's two broadcasts) on the same 30 workers.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

from bench.databases import create_database

ALIASES = ("default", "global", "twin")
ROUNDS = int(os.environ.get("BENCH_METRICS_ROUNDS", "30"))
RECORDS = int(os.environ.get("BENCH_METRICS_RECORDS", "100000"))
RECENT = int(os.environ.get("BENCH_METRICS_RECENT", "3000"))
NAMES = 100
WORKERS = 10
TOKEN = "bench-metrics-token-0123456789abcdef"
TAG = "bench-metrics-"


def seed(worker_names: dict[str, list[str]] | None = None) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from django_celery_adv.locks.backends import lock_backends
    from django_celery_adv.locks.backends.base import Holder
    from django_celery_adv.models import (
        BeatNode,
        LockDefinition,
        TaskFailure,
        TaskRecord,
        TaskRecorderStats,
    )

    now = timezone.now()
    unseed()
    names = [f"bench.tasks.task_{i:03d}" for i in range(NAMES)]
    week = 7 * 24 * 3600
    for alias in ALIASES:
        heartbeats = {name: {"active": 1, "heartbeat_at": time.time(), "processed": 100}
                      for name in (worker_names or {}).get(alias, [])}
        TaskRecorderStats.objects.update_or_create(app_alias=alias, defaults={
            "events_seen": 10**6, "events_dropped": 3, "last_event_at": now,
            "workers": heartbeats,
            "task_counts": {name: {"RECEIVED": 500, "STARTED": 500, "SUCCESS": 480,
                                   "FAILURE": 20} for name in names}})
        for start in range(0, RECORDS, 10000):
            batch = []
            for i in range(start, min(RECORDS, start + 10000)):
                state = "STARTED" if i % 100 == 0 else "FAILURE" if i % 10 == 1 else "SUCCESS"
                age = (i % 290) if i < RECENT else 600 + (i * 7919) % week
                batch.append(TaskRecord(
                    app_alias=alias, task_id=f"{TAG}{alias}-{i}", name=names[i % NAMES],
                    state=state, updated_at=now - timedelta(seconds=age),
                    runtime=None if state == "STARTED" else (i % 97) / 10,
                    queue_wait=None if state == "STARTED" else (i % 13) / 20))
            TaskRecord.objects.bulk_create(batch, batch_size=2000)
        BeatNode.objects.update_or_create(
            app_alias=alias, hostname=f"{TAG}host", pid=1,
            defaults={"role": "leader", "started_at": now, "last_tick": now,
                      "max_interval": 5})
        TaskFailure.objects.bulk_create([
            TaskFailure(fingerprint=f"{TAG}{alias}-{i}", task_name=names[i],
                        exception_type="ValueError", app_alias=alias, count=1,
                        first_seen=now - timedelta(days=1), last_seen=now)
            for i in range(10)])
    backend = lock_backends["default"]
    for i in range(20):
        LockDefinition.objects.get_or_create(name=f"{TAG}lock-{i}", defaults={"capacity": 2})
        if i % 2:
            backend.acquire(f"{TAG}lock-{i}", 2, Holder(task_id=f"{TAG}{i}"), 600)


def unseed() -> None:
    from django_celery_adv.locks.backends import lock_backends
    from django_celery_adv.models import BeatNode, LockDefinition, TaskFailure, TaskRecord

    TaskRecord.objects.filter(task_id__startswith=TAG).delete()
    TaskFailure.objects.filter(fingerprint__startswith=TAG).delete()
    BeatNode.objects.filter(hostname__startswith=TAG).delete()
    backend = lock_backends["default"]
    for name in LockDefinition.objects.filter(name__startswith=TAG).values_list("name",
                                                                               flat=True):
        for lease in backend.holders(name):
            backend.force_release(name, lease.token)
    LockDefinition.objects.filter(name__startswith=TAG).delete()


class Broadcasts:
    """Counts the control commands published (every broadcast and inspect goes here)."""

    def __init__(self) -> None:
        from kombu import pidbox

        self.sent: list[str] = []
        original = pidbox.Mailbox._publish
        sent = self.sent

        def counted(mailbox, type, *args, **kwargs):
            sent.append(type)
            return original(mailbox, type, *args, **kwargs)

        self.patch = mock.patch.object(pidbox.Mailbox, "_publish", counted)

    def __enter__(self) -> Broadcasts:
        self.patch.start()
        return self

    def __exit__(self, *exc) -> None:
        self.patch.stop()


def measure_metrics() -> dict:
    from django.conf import settings
    from django.db import connection
    from django.test import Client, override_settings
    from django.test.utils import CaptureQueriesContext
    from prometheus_client.parser import text_string_to_metric_families

    config = {**settings.CELERY_ADV, "METRICS": {"TOKEN": TOKEN}}
    client = Client(HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    times, queries = [], set()
    with override_settings(CELERY_ADV=config), Broadcasts() as broadcasts:
        response = client.get("/celery-adv/metrics")  # warm: connections, imports
        assert response.status_code == 200, response.status_code
        for _ in range(ROUNDS):
            with CaptureQueriesContext(connection) as captured:
                started = time.perf_counter()
                response = client.get("/celery-adv/metrics")
                times.append(time.perf_counter() - started)
            assert response.status_code == 200
            queries.add(len(captured))
    text = response.content.decode()
    series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    up = {alias: series.get(("celery_adv_workers_up", (("app", alias),))) for alias in ALIASES}
    assert all(count == WORKERS for count in up.values()), up
    active = {alias: series.get(("celery_adv_tasks_active", (("app", alias),)))
              for alias in ALIASES}
    assert all(count == WORKERS for count in active.values()), active
    errors = [key for key in series if key[0] == "celery_adv_scrape_error"]
    assert not errors, errors
    names = {dict(labels).get("name") for name, labels in series
             if name == "celery_adv_tasks_total"}
    assert len(names) >= NAMES, len(names)
    times.sort()
    return {"median_ms": statistics.median(times) * 1000,
            "p95_ms": times[int(0.95 * (len(times) - 1))] * 1000,
            "max_ms": times[-1] * 1000, "queries": sorted(queries),
            "series": len(series), "bytes": len(response.content),
            "broadcasts": len(broadcasts.sent), "requests": ROUNDS + 1}


def measure_inspect_exporter(rounds: int = 3) -> dict:
    """What an inspect-based exporter costs per scrape: stats + active per app."""
    from django_celery_adv.registry import apps

    times = []
    with Broadcasts() as broadcasts:
        for _ in range(rounds):
            started = time.perf_counter()
            for alias in ALIASES:
                inspector = apps[alias].control.inspect(timeout=1.0)
                inspector.stats()
                inspector.active()
            times.append(time.perf_counter() - started)
    return {"median_ms": statistics.median(times) * 1000,
            "broadcasts_per_scrape": len(broadcasts.sent) / rounds}


def own_database() -> None:
    """A database of this benchmark's own (the other benchmarks, e.g. the fleet's
    thousands of simulated workers, leave their rows in the shared bench database):
    ``metrics.sqlite3`` beside ``bench.sqlite3``, made anew; on PostgreSQL and
    MariaDB ``celery_adv_bench_metrics``, created when missing."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        db["NAME"] = Path(db["NAME"]).with_name("metrics.sqlite3")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db['NAME']}{suffix}").unlink(missing_ok=True)
        return
    db["NAME"] = "celery_adv_bench_metrics"
    create_database(db)

def main() -> int:
    from bench.inspect_all import Workers, setup_django

    own_database()
    setup_django()
    from django.db import connection

    from bench.report import write_section
    from django_celery_adv.monitoring import inspect_all

    workers = Workers()
    started = time.monotonic()
    try:
        workers.start(per_app=WORKERS)
        print(f"30 workers up in {time.monotonic() - started:.0f} s", flush=True)
        inspect_all(timeout=1.0)  # the stored reading the scrapes will use
        seed_started = time.monotonic()
        seed(workers.names)
        print(f"seeded in {time.monotonic() - seed_started:.0f} s", flush=True)
        ours = measure_metrics()
        print(ours, flush=True)
        theirs = measure_inspect_exporter()
        print(theirs, flush=True)
    finally:
        workers.stop()
        unseed()
    vendor = connection.vendor
    queries = ", ".join(str(q) for q in ours["queries"])
    body = (
        f"3 apps (Redis, RabbitMQ, a second app on the same Redis) x {WORKERS} real solo-pool "
        f"workers (a stored reading and a heartbeat each), {NAMES} task names per app in the "
        f"recorder's counters, {RECORDS:,} stored task records per app ({RECENT:,} finished "
        "within the 5-minute histogram window, the rest over the week before), 20 lock "
        "definitions on the database backend (10 held), "
        "10 open failure groups and a beat leader row per app; queue lengths read from the "
        f"real brokers at each scrape. `GET /celery-adv/metrics` with the bearer token, "
        f"Django's test client in process, {ROUNDS} requests after one warm-up.\n\n"
        "| variant | median (ms) | p95 (ms) | max (ms) | SQL queries | series | "
        "control commands sent |\n|---|---:|---:|---:|---:|---:|---:|\n"
        f"| `/metrics` (ours) | {ours['median_ms']:.1f} | {ours['p95_ms']:.1f} | "
        f"{ours['max_ms']:.1f} | {queries} | {ours['series']:,} | {ours['broadcasts']} in "
        f"{ours['requests']} scrapes |\n"
        f"| inspect-based exporter: `stats()` + `active()` per app, same workers | "
        f"{theirs['median_ms']:.0f} | | | 0 | | {theirs['broadcasts_per_scrape']:.0f} per scrape |"
        "\n\nTarget: <= 100 ms server time, zero broadcasts. The scrape reads the stored "
        "workers reading (`monitoring.last_reading`), the recorder's counters and task "
        "records, lock holders and beat rows, plus one bounded queue-length read per app; "
        "an inspect-based exporter waits out Celery's inspect timeout (1 s) per command "
        "and app (celery #5916).\n")
    write_section(f"metrics-{vendor}", f"`/metrics`: 3 apps x 10 workers x 100 task names "
                  f"({vendor} database)", body,
                  data={k: ours[k] for k in ("median_ms", "p95_ms", "broadcasts", "series")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
