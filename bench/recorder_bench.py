"""Event recorder and admin Tasks page benchmarks (issue 10).

Run from the repository root (``bash scripts/bench.sh`` runs it; ``TEST_DB``
picks SQLite or PostgreSQL as for the tests)::

    .venv/bin/python -m bench.recorder_bench

1. **Stream.** Two real prefork workers (``-E``, concurrency 1 each, Redis
   app) run ``BENCH_STREAM_TASKS`` trivial tasks sent as fast as the client
   can; every event is captured with Celery's ``Receiver``. Its rate is the
   fastest stream two workers produce on this machine.
2. **Replay**, the same recorded stream (repeated with fresh task ids to
   ``BENCH_REPLAY_EVENTS`` events) into: Celery's in-memory
   ``app.events.State`` (Flower's core); our recorder's merge + batched
   upserts into this database, as fast as it goes (events/s until the last
   commit); and paced at the captured stream's rate (lag p99 = commit time -
   receipt, per task).
3. **Tasks page** with ``BENCH_TASK_ROWS`` (1,000,000) stored records: server
   time (Django's test client in process) and SQL queries of the changelist,
   filtered, deep page, search by id and a detail page.

The benchmark keeps its own database (``build/bench/recorder.sqlite3`` or
``celery_adv_bench_events``) so its million rows never meet another bench.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
import uuid

from bench.databases import create_database

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STREAM_TASKS = int(os.environ.get("BENCH_STREAM_TASKS", "3000"))
REPLAY_EVENTS = int(os.environ.get("BENCH_REPLAY_EVENTS", "60000"))
TASK_ROWS = int(os.environ.get("BENCH_TASK_ROWS", "1000000"))
PAGE_ROUNDS = int(os.environ.get("BENCH_PAGE_ROUNDS", "20"))


def setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    from django.conf import settings

    db = settings.DATABASES["default"]
    if not db["ENGINE"].endswith(("sqlite3", "postgresql")):
        print("recorder_bench: SQLite and PostgreSQL only; skipped on this database")
        sys.exit(0)
    if db["ENGINE"].endswith("sqlite3"):
        db["NAME"] = os.path.join(ROOT, "build", "bench", "recorder.sqlite3")
    else:
        db["NAME"] = "celery_adv_bench_events"
        create_database(db)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


# -- 1. the stream --------------------------------------------------------------------

def capture_stream() -> tuple[list[dict], float]:
    """Events of STREAM_TASKS tasks run by two real workers; (events, events/s)."""
    from django_celery_adv.registry import apps
    from tests.testapp.event_tasks import default as tasks
    from tests.workers import WorkerProcess

    app = apps["default"]
    app.control.purge()
    workers = [WorkerProcess("default", concurrency=1, settings_module="bench.settings",
                             tag=f"-rec{i}", extra_args=("-E",)) for i in range(2)]
    events: list[dict] = []
    done = threading.Event()
    finals = {"n": 0}

    def on_event(event: dict) -> None:
        if event["type"].startswith("task-"):
            events.append(event)
            if event["type"] == "task-succeeded":
                finals["n"] += 1
                if finals["n"] >= STREAM_TASKS:
                    done.set()

    try:
        for worker in workers:
            worker.env["TEST_USE_TEST_DB"] = "0"
            worker.start()
        ready = threading.Event()

        def consume() -> None:
            with app.connection_for_read() as connection:
                receiver = app.events.Receiver(connection, handlers={"*": on_event})
                ready.set()
                for _ in receiver.consume(limit=None, safety_interval=0.2, wakeup=False):
                    if done.is_set():
                        break

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        ready.wait(10)
        time.sleep(0.5)
        with app.producer_or_acquire() as producer:
            for i in range(STREAM_TASKS):
                tasks["work"].apply_async((i,), producer=producer)
        done.wait(300)
        thread.join(5)
    finally:
        for worker in workers:
            worker.stop()
    times = [e["local_received"] for e in events]
    return events, len(events) / max(1e-9, max(times) - min(times))


def replayed(events: list[dict], total: int) -> list[dict]:
    """The stream repeated with fresh task ids until ``total`` events."""
    out: list[dict] = []
    while len(out) < total:
        ids: dict[str, str] = {}
        for event in events:
            copy = dict(event)
            copy["uuid"] = ids.setdefault(event["uuid"], uuid.uuid4().hex)
            out.append(copy)
            if len(out) >= total:
                break
    return out


# -- 2. replay ------------------------------------------------------------------------

def replay_state(stream: list[dict]) -> float:
    from django_celery_adv.registry import apps

    state = apps["default"].events.State(max_tasks_in_memory=len(stream))
    started = time.perf_counter()
    for event in stream:
        state.event(event)
    return len(stream) / (time.perf_counter() - started)


def replay_recorder(stream: list[dict], rate: float | None) -> dict:
    """Feed the recorder (no broker); events/s until the last commit, lag p99, drops."""
    from django_celery_adv.events import settings_for
    from django_celery_adv.events.recorder import AppRecorder
    from django_celery_adv.models import TaskRecord, TaskRecorderStats

    TaskRecord.objects.all().delete()
    TaskRecorderStats.objects.all().delete()
    recorder = AppRecorder("default", {**settings_for("default"),
                                       "MAX_PENDING": len(stream)}, enable_events=False)
    writer = threading.Thread(target=recorder.write_loop, daemon=True)
    writer.start()
    started = time.perf_counter()
    for index, event in enumerate(stream):
        if rate:
            wait = started + index / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        recorder.on_event({**event, "local_received": time.time()})
    recorder.consumer_done.set()
    writer.join()
    elapsed = time.perf_counter() - started
    stats = TaskRecorderStats.objects.get(app_alias="default")
    lags = sorted(recorder.lag)
    return {"rate": len(stream) / elapsed, "elapsed": elapsed,
            "p50": lags[len(lags) // 2], "p99": lags[int(len(lags) * 0.99)],
            "dropped": stats.events_dropped, "written": stats.events_written,
            "tasks": TaskRecord.objects.count()}


# -- 3. the Tasks page ----------------------------------------------------------------

def fill_records(rows: int) -> None:
    from django.db import connection, transaction
    from django.utils import timezone

    from django_celery_adv.models import TaskRecord, TaskRecorderStats

    have = TaskRecord.objects.count()
    if have >= rows:
        return
    TaskRecord.objects.all().delete()
    table = TaskRecord._meta.db_table
    columns = ["app_alias", "task_id", "name", "state", "worker", "args", "kwargs",
               "retryable", "result", "exception", "traceback", "received_at", "started_at",
               "succeeded_at", "failed_at", "runtime", "queue_wait", "retries", "parent_id",
               "root_id", "state_timestamp", "updated_at"]
    sql = (f"INSERT INTO {table} ({', '.join(columns)}) "
           f"VALUES ({', '.join(['%s'] * len(columns))})")
    now = timezone.now()
    names = [f"bench.task{i}" for i in range(100)]
    started = time.perf_counter()
    chunk = 20000
    for start in range(0, rows, chunk):
        batch = []
        for i in range(start, min(rows, start + chunk)):
            failed = i % 10 == 0
            batch.append((("default", "global", "twin")[i % 3], uuid.uuid4().hex,
                          names[i % 100], "FAILURE" if failed else "SUCCESS",
                          f"w{i % 20}@bench", f"({i},)", "{}", True, "" if failed else str(i),
                          "ValueError('x')" if failed else "", "", now, now,
                          None if failed else now, now if failed else None,
                          (i * 7919 % 10007) / 1000, (i * 104729 % 1009) / 1000, 0,
                          "", "", 0.0, now))
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.executemany(sql, batch)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {table}")
    for alias in ("default", "global", "twin"):
        TaskRecorderStats.objects.update_or_create(app_alias=alias, defaults={
            "task_counts": {name: {"SUCCESS": 1} for name in names},
            "workers": {f"w{i}@bench": {"processed": 1} for i in range(20)}})
    print(f"recorder_bench: {rows} records in {time.perf_counter() - started:.0f} s",
          flush=True)


def measure_pages() -> list[tuple[str, float, float, int]]:
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from django.urls import reverse

    from django_celery_adv.models import TaskRecord

    user = User.objects.filter(username="bench-admin").first() or \
        User.objects.create_superuser("bench-admin", password="x")
    client = Client()
    client.force_login(user)
    base = reverse("admin:django_celery_adv_taskrecord_changelist")
    # A record deep in the table, not the newest (at most the 12,346th newest).
    count = TaskRecord.objects.count()
    some = TaskRecord.objects.order_by("-id").values_list("pk", "task_id")[min(12345,
                                                                              count - 1)]
    pages = [
        ("changelist, first page", base),
        ("state = failed, app = global", base + "?state__exact=FAILURE&app_alias=global"),
        ("task name + worker", base + "?name=bench.task7&worker=w7%40bench"),
        ("page 100", base + "?p=100"),
        ("sorted by runtime", base + "?o=7"),
        ("search by task id", base + f"?q={some[1][:8]}-{some[1][8:]}"),
        ("task detail", reverse("admin:django_celery_adv_taskrecord_change", args=[some[0]])),
    ]
    rows = []
    for label, url in pages:
        times, queries = [], 0
        for _ in range(PAGE_ROUNDS):
            with CaptureQueriesContext(connection) as captured:
                started = time.perf_counter()
                response = client.get(url)
                times.append(time.perf_counter() - started)
            assert response.status_code == 200, (url, response.status_code)
            queries = len(captured)
        rows.append((label, statistics.median(times), max(times), queries))
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    setup_django()
    from django.db import connection

    from bench.report import DATABASES, database, write_section

    db = database()
    events, stream_rate = capture_stream()
    print(f"recorder_bench: captured {len(events)} events at {stream_rate:.0f}/s", flush=True)
    stream = replayed(events, REPLAY_EVENTS)
    state_rate = replay_state(stream)
    fast = replay_recorder(stream, None)
    paced = replay_recorder(stream[:min(len(stream), int(stream_rate * 15))], stream_rate)
    print(f"recorder_bench: State {state_rate:.0f}/s, recorder {fast}, paced {paced}",
          flush=True)
    fill_records(TASK_ROWS)
    pages = measure_pages()
    name = DATABASES.get(db, db)
    body = (
        f"Stream: {STREAM_TASKS} trivial tasks on two real prefork workers (`-E`, "
        f"concurrency 1 each, Redis app), all events captured with Celery's `Receiver`: "
        f"{len(events)} task events at **{stream_rate:,.0f} events/s**, the fastest stream "
        "two workers produce here. Replayed (fresh task ids) "
        f"{len(stream):,} events:\n\n"
        "| consumer | events/s | x State | lag p50 (s) | lag p99 (s) | dropped |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        f"| Celery `app.events.State` (in memory, Flower's core) | {state_rate:,.0f} | 1.00x "
        "| - | - | - |\n"
        f"| our recorder into {name}, as fast as it goes (until the last commit) | "
        f"{fast['rate']:,.0f} | {fast['rate'] / state_rate:.2f}x | {fast['p50']:.2f} | "
        f"{fast['p99']:.2f} | {fast['dropped']} |\n"
        f"| our recorder into {name}, paced at the stream's rate | {paced['rate']:,.0f} | "
        f"- | {paced['p50']:.2f} | {paced['p99']:.2f} | {paced['dropped']} |\n\n"
        f"Targets: >= 0.5x the in-memory rate, and more than the stream's "
        f"{stream_rate:,.0f} events/s. Lag is commit time minus receipt per task; batches "
        "are written at most once a second, so a paced lag near 1 s is the design. The "
        "recorder's rate counts from the first event fed to the last commit; the writer "
        "thread commits while events are still being merged in memory, and State builds "
        "Task and Worker objects per event, so the two can be close.\n\n"
        f"Tasks page with {stored_tasks():,} stored tasks ({name}; Django's test client "
        f"in process, {PAGE_ROUNDS} requests each; the count stops at 10 pages ahead):\n\n"
        "| page | median (s) | max (s) | SQL queries |\n|---|---:|---:|---:|\n"
        + "\n".join(f"| {label} | {median:.3f} | {worst:.3f} | {queries} |"
                    for label, median, worst, queries in pages)
        + "\n\nTarget: <= 0.3 s server time and a fixed query count.")
    write_section(f"recorder-{db}", f"Event recorder and Tasks page ({name})", body,
                  data={"stream_rate": stream_rate, "state_rate": state_rate,
                        "recorder_rate": fast["rate"], "paced_p99": paced["p99"],
                        "page_s": pages[0][1], "page_queries": pages[0][3]})
    connection.close()
    return 0


def stored_tasks() -> int:
    from django_celery_adv.models import TaskRecord

    return TaskRecord.objects.count()


if __name__ == "__main__":
    sys.exit(main())
