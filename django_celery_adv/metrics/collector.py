"""The Prometheus collector: what the database, the last readings and the brokers hold now.

:class:`CeleryAdvCollector` is a ``prometheus_client`` custom collector, never
registered in the library's global default registry: :func:`render` runs it
once per scrape, so a project's own metrics and ours never mix and importing
this module has no side effect. A project that wants our series beside its own
may register a ``CeleryAdvCollector()`` in its registry itself.

Guarantees:

* **No broadcast.** A scrape sends no ``inspect``/control command to any
  worker (celery-exporter sends two per scrape). Workers come from the last
  reading the fleet monitor stored (``monitoring.last_reading``, else the
  seen-workers record) and the recorder's heartbeats; active tasks from the
  heartbeats (each carries the worker's active count), else from the reading
  if it asked ``active``; task counts from the recorder's counters and
  records; beat from the beats' own rows. The only network reads are one
  cheap queue-length read per app on its broker, and the lock holders of
  each lock definition on its lock server.
* **Cost independent of retention.** No query scans the task history: the
  histograms read the records updated within ``HISTOGRAM_WINDOW`` (an index
  range), the unfinished gauge the records in an unfinished state (an index
  range), the counters one row per app.
* **Bounded.** The queue reads (``SERVER_TIMEOUT`` is their connect and
  socket timeout) and the holders of locks on lock servers run in threads
  while the database is read; the scrape waits for them at most
  ``CELERY_ADV["METRICS"]["SERVER_TIMEOUT"]`` + :data:`BACKGROUND_GRACE`
  seconds, then answers without them (error series ``error="Timeout"``).
* **Never a 500 for a dead server.** Each source is read on its own; one that
  fails (a broker or lock server down, a table not migrated) leaves its series
  out and adds ``celery_adv_scrape_error{app, source, error} 1`` instead, with
  the exception's class name only (a message could carry a secret). A lock
  backend that failed once is not asked again in the same scrape.
* **Every series has an ``app`` label.** Locks are shared by all apps: their
  series, and errors not tied to one app, carry ``app="*"``.

Counter semantics: ``celery_adv_tasks_total`` (task events by name and state)
and the two event counters come from the recorder's per-app counters
(``TaskRecorderStats``), cumulative since the app's row was made: they survive
pruning and recorder restarts, so ``rate()`` is right. They are not counted
from the stored records, which pruning deletes (a count that falls would read
as a counter reset and over-count ``increase()``). The runtime and queue-wait
histograms are *gauge histograms* (OpenMetrics ``gaugehistogram``): the
distribution over the tasks that finished in the last
``METRICS["HISTOGRAM_WINDOW"]`` seconds (default 300), read without ``rate()``,
e.g. ``histogram_quantile(0.95, sum by (le) (celery_adv_task_runtime_seconds_bucket))``.
Unfinished tasks (``PENDING``, ``RECEIVED``, ``STARTED``, ``RETRY``) move
between states: a gauge, ``celery_adv_tasks_unfinished``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from celery import states
from django.utils import timezone
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .. import conf
from ..registry import apps

logger = logging.getLogger(__name__)

PREFIX = "celery_adv_"
#: The ``app`` label of series that belong to no one app (locks, the scrape itself).
ALL_APPS = "*"
#: Final states of a task record (Celery's ready states, and a rejected message).
FINISHED_STATES = tuple(sorted({*states.READY_STATES, states.REJECTED}))
#: States a task record passes through before a final one.
UNFINISHED_STATES = (states.PENDING, states.RECEIVED, states.STARTED, states.RETRY)
#: Bucket bounds (seconds) of the runtime and queue-wait histograms: ten, so that a
#: runtime histogram per task name stays affordable (13 series per name and app).
BUCKETS = (0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)

#: name (without the prefix, and without ``_total`` for counters) -> (type, help, labels).
#: Every metric family the collector can export; the docs' dashboard and alert
#: rules are tested against this list.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "tasks": ("counter", "Task events the recorder received, by task name and state.",
              ("app", "name", "state")),
    "tasks_unfinished": ("gauge", "Stored task records not finished yet, by state.",
                         ("app", "name", "state")),
    "task_runtime_seconds": ("gaugehistogram", "Runtime of the tasks finished in the last "
                             "METRICS['HISTOGRAM_WINDOW'] seconds.", ("app", "name")),
    "task_queue_wait_seconds": ("gaugehistogram", "Time from received to started of the "
                                "tasks finished in the last METRICS['HISTOGRAM_WINDOW'] "
                                "seconds (per app: waiting is the queue's doing, not the "
                                "task's).", ("app",)),
    "queue_length": ("gauge", "Messages ready in a queue, read from the broker.",
                     ("app", "queue")),
    "workers_up": ("gauge", "Workers seen within MONITORING['SILENT_WINDOW'] (a reading or "
                   "a heartbeat).", ("app",)),
    "worker_up": ("gauge", "1 if the worker was seen within MONITORING['SILENT_WINDOW'].",
                  ("app", "worker")),
    "tasks_active": ("gauge", "Tasks executing now on the app's workers, per their latest "
                     "heartbeat, else the last reading.", ("app",)),
    "worker_tasks_active": ("gauge", "Tasks executing now on one worker, per its latest "
                            "heartbeat, else the last reading.", ("app", "worker")),
    "reading_age_seconds": ("gauge", "Age of the last workers reading used.", ("app",)),
    "lock_holders": ("gauge", "Live leases of a lock.", ("app", "lock", "backend")),
    "lock_capacity": ("gauge", "How many may hold a lock at once (0: paused).",
                      ("app", "lock", "backend")),
    "task_failure_groups_open": ("gauge", "Task-failure groups not resolved.", ("app",)),
    "events": ("counter", "Task and worker events the recorder received.", ("app",)),
    "recorder_last_event_age_seconds": ("gauge", "Seconds since the newest event the "
                                        "recorder received.", ("app",)),
    "events_dropped": ("counter", "Events the recorder dropped (database behind).", ("app",)),
    "beat_leader": ("gauge", "1 if a beat leader row exists for the app.", ("app",)),
    "beat_last_tick_age_seconds": ("gauge", "Seconds since the beat leader's last tick.",
                                   ("app",)),
    "scrape_error": ("gauge", "1 per source that could not be read in this scrape.",
                     ("app", "source", "error")),
    "scrape_duration_seconds": ("gauge", "Time this scrape spent per source.",
                                ("app", "source")),
}


def metric_names() -> set[str]:
    """Every sample name a scrape may contain (``_total``, ``_bucket``... included)."""
    names: set[str] = set()
    for short, (kind, _, _) in METRICS.items():
        base = PREFIX + short
        if kind == "counter":
            names.add(base + "_total")
        elif kind == "gaugehistogram":
            names.update({base + "_bucket", base + "_gsum", base + "_gcount"})
        else:
            names.add(base)
    return names


@dataclass
class Scrape:
    """The families of one scrape, built up by the sources."""

    families: dict[str, Metric] = field(default_factory=dict)
    #: alias -> the stored workers reading used (lets the queue read name consumed queues).
    readings: dict[str, Any] = field(default_factory=dict)
    #: alias -> the recorder's per-worker heartbeat entries (``TaskRecorderStats.workers``).
    heartbeats: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: (lock name, backend alias) of the definitions on the database / on a lock server.
    database_locks: list[tuple[str, str]] = field(default_factory=list)
    server_locks: list[tuple[str, str]] = field(default_factory=list)

    def family(self, short: str) -> Any:
        if short not in self.families:
            kind, documentation, labels = METRICS[short]
            cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
                   "gaugehistogram": GaugeHistogramMetricFamily}[kind]
            self.families[short] = cls(PREFIX + short, documentation, labels=list(labels))
        return self.families[short]

    def add(self, short: str, labels: Iterable[str], value: float) -> None:
        self.family(short).add_metric(list(labels), value)

    def merge(self, other: Scrape) -> None:
        """Add the samples of ``other`` (a source read in another thread)."""
        for short, family in other.families.items():
            self.family(short).samples.extend(family.samples)

    def error(self, app: str, source: str, error: BaseException) -> None:
        self.add("scrape_error", (app, source, type(error).__name__), 1)


# -- sources: each reads one kind of stored fact; a failure is its error series --

def read_tasks(scrape: Scrape, aliases: list[str]) -> None:
    """Unfinished-task gauges and the windowed histograms from ``TaskRecord`` rows.

    Two queries, both on an index range whatever the retention: the records in
    an unfinished state, and the finished records updated within the window
    (grouped by app and name: the runtime histogram per name; their bucket
    counts summed here into the queue-wait one per app).
    """
    from datetime import timedelta

    from django.db.models import Count, Q, Sum

    from ..models import TaskRecord

    # By state only, apps filtered here: with the app in the WHERE clause SQLite
    # walks the (app, id) index over the whole history instead of the state index.
    wanted = set(aliases)
    for row in TaskRecord.objects.filter(state__in=UNFINISHED_STATES).values(
            "app_alias", "name", "state").annotate(n=Count("pk")).order_by():
        if row["app_alias"] in wanted:
            scrape.add("tasks_unfinished", (row["app_alias"], row["name"], row["state"]),
                       row["n"])
    rows = TaskRecord.objects.filter(app_alias__in=aliases)
    since = timezone.now() - timedelta(seconds=float(conf.metrics("HISTOGRAM_WINDOW")))
    columns = {"task_runtime_seconds": "runtime", "task_queue_wait_seconds": "queue_wait"}
    aggregates: dict[str, Any] = {}
    for short, column in columns.items():
        aggregates[f"{short}:count"] = Count(column)
        aggregates[f"{short}:sum"] = Sum(column)
        aggregates.update({f"{short}:{i}": Count("pk", filter=Q(**{f"{column}__lte": bound}))
                           for i, bound in enumerate(BUCKETS)})
    histograms: dict[tuple[str, tuple[str, ...]], list[float]] = {}
    for row in rows.filter(updated_at__gte=since, state__in=FINISHED_STATES).values(
            "app_alias", "name").annotate(**aggregates).order_by():
        for short, labels in (("task_runtime_seconds", (row["app_alias"], row["name"])),
                              ("task_queue_wait_seconds", (row["app_alias"],))):
            if not row[f"{short}:count"]:
                continue
            totals = histograms.setdefault((short, labels), [0.0] * (len(BUCKETS) + 2))
            for i in range(len(BUCKETS)):
                totals[i] += row[f"{short}:{i}"]
            totals[-2] += row[f"{short}:count"]
            totals[-1] += float(row[f"{short}:sum"] or 0.0)
    for (short, labels), totals in sorted(histograms.items()):
        buckets = [(_le(bound), totals[i]) for i, bound in enumerate(BUCKETS)]
        scrape.family(short).add_metric(list(labels), [*buckets, ("+Inf", totals[-2])],
                                        totals[-1])


def read_recorder(scrape: Scrape, aliases: list[str]) -> None:
    """Task-event counters and event counters from the recorder's per-app row."""
    from ..models import TaskRecorderStats

    now = timezone.now()
    for stats in TaskRecorderStats.objects.filter(app_alias__in=aliases).only(
            "app_alias", "events_seen", "events_dropped", "last_event_at", "task_counts",
            "workers"):
        alias = stats.app_alias
        if isinstance(stats.workers, dict):
            scrape.heartbeats[alias] = stats.workers
        scrape.add("events", (alias,), stats.events_seen)
        scrape.add("events_dropped", (alias,), stats.events_dropped)
        if stats.last_event_at is not None:
            scrape.add("recorder_last_event_age_seconds", (alias,),
                       max(0.0, (now - stats.last_event_at).total_seconds()))
        counts = stats.task_counts if isinstance(stats.task_counts, dict) else {}
        for name, by_state in sorted(counts.items()):
            if isinstance(by_state, dict):
                for state, count in sorted(by_state.items()):
                    if isinstance(count, int | float):
                        scrape.add("tasks", (alias, str(name), str(state)), count)


def _le(bound: float) -> str:
    return repr(float(bound))


def read_workers(scrape: Scrape, aliases: list[str]) -> None:
    """Workers up and active tasks from what was stored (never asks a worker).

    A worker is up when its last sign of life (an answer to a reading, or a
    heartbeat the recorder saw) is within ``MONITORING["SILENT_WINDOW"]`` and
    the recorder did not see it go offline. Its active count is that of its
    latest heartbeat when the heartbeat is that recent, else the reading's
    (known only if the reading asked ``active``); unknown leaves the series out.
    """
    from .. import monitoring

    window = float(conf.monitoring("SILENT_WINDOW"))
    last_reading: Callable[[str], Any] | None = getattr(monitoring, "last_reading", None)
    now = time.time()
    for alias in aliases:
        try:
            reading = last_reading(alias) if last_reading is not None else None
            if reading is not None:
                scrape.readings[alias] = reading
                workers = _workers_of(reading, scrape, alias, now)
            else:  # no reading stored yet: workers known only from signs of life
                workers = {name: (seen, None) for name, seen in
                           monitoring.load_seen(alias).items()}
        except Exception as e:  # a table not migrated, a cache down: this app's error
            scrape.error(alias, "workers", e)
            continue
        offline: set[str] = set()
        for name, beat in scrape.heartbeats.get(alias, {}).items():
            at = beat.get("heartbeat_at") if isinstance(beat, dict) else None
            if not isinstance(at, int | float):
                continue
            seen, active = workers.get(name, (None, None))
            fresh = now - at <= window
            workers[name] = (max(seen or 0.0, float(at)),
                             beat.get("active") if fresh and isinstance(
                                 beat.get("active"), int) else active)
            if beat.get("offline") and (seen is None or seen <= at):
                offline.add(name)
        up = running = 0
        known_running = False
        for name, (seen, active) in sorted(workers.items()):
            alive = seen is not None and now - seen <= window and name not in offline
            up += alive
            scrape.add("worker_up", (alias, name), int(alive))
            if active is not None:
                known_running = True
                running += active if alive else 0
                scrape.add("worker_tasks_active", (alias, name), active if alive else 0)
        scrape.add("workers_up", (alias,), up)
        if known_running or not workers:
            scrape.add("tasks_active", (alias,), running)


def _workers_of(reading: Any, scrape: Scrape, alias: str,
                now: float) -> dict[str, tuple[float | None, int | None]]:
    """name -> (last seen epoch, running) per worker of a stored ``AppStatus`` reading."""
    read_at = getattr(reading, "read_at", None)
    if read_at is not None:
        scrape.add("reading_age_seconds", (alias,), max(0.0, now - read_at.timestamp()))
    result = {}
    for worker in getattr(reading, "workers", None) or ():
        seen = getattr(worker, "last_seen", None)
        result[worker.name] = (seen.timestamp() if seen else None,
                               getattr(worker, "running", None))
    return result


def read_queue_lengths(scrape: Scrape, aliases: list[str]) -> None:
    """Messages ready per queue: one bounded broker read per app (no broadcast).

    The queues are those the app's settings declare plus those its workers
    consume per the stored reading. A broker that fails leaves its app's
    queue series out and adds its error series; a transport whose counts
    cannot be read (filesystem, SQS ...) gives no series at all.
    """
    try:
        from ..queues import read_queues
    except ImportError:  # this version has no queue reader
        return
    timeout = conf.metrics("SERVER_TIMEOUT")
    statuses = {alias: reading for alias, reading in scrape.readings.items()
                if reading is not None}
    for alias, reading in read_queues(aliases, statuses, timeout=timeout).items():
        if reading.error is not None:
            scrape.add("scrape_error", (alias, "queues", "BrokerError"), 1)
            continue
        for queue in reading.queues:
            if queue.ready is not None:
                scrape.add("queue_length", (alias, queue.name), queue.ready)


def read_locks(scrape: Scrape, aliases: list[str]) -> None:
    """Capacity of every lock definition, and the holders of those on the database
    lock backend (shared by all apps: ``app="*"``). The locks on lock servers are
    left to :func:`read_lock_servers`, which runs in the background."""
    from ..models import LockDefinition

    for name, backend, capacity in LockDefinition.objects.values_list(
            "name", "backend", "capacity"):
        scrape.add("lock_capacity", (ALL_APPS, name, backend), capacity)
        settings = conf.lock_backend_settings().get(backend) or {}
        on_database = settings.get("BACKEND") == conf.DATABASE_LOCK_BACKEND
        (scrape.database_locks if on_database else scrape.server_locks).append((name, backend))
    _read_holders(scrape, scrape.database_locks)


def read_lock_servers(scrape: Scrape, aliases: list[str]) -> None:
    """Holders of the locks on lock servers (Redis, ZooKeeper, etcd, MongoDB)."""
    _read_holders(scrape, scrape.server_locks)


def _read_holders(scrape: Scrape, locks: list[tuple[str, str]]) -> None:
    from ..locks.operations import HolderReader

    reader = HolderReader()  # a backend that failed is not asked again
    failed: set[str] = set()
    for name, backend in locks:
        reading = reader.read(name, backend)
        if reading.error is None:
            scrape.add("lock_holders", (ALL_APPS, name, backend), len(reading.leases))
        elif backend not in failed:
            failed.add(backend)
            scrape.add("scrape_error", (ALL_APPS, f"locks:{backend}", "LockError"), 1)


def read_failures(scrape: Scrape, aliases: list[str]) -> None:
    """Open (unresolved) task-failure groups per app."""
    from django.db.models import Count

    from ..models import TaskFailure

    counts = dict.fromkeys(aliases, 0)
    for row in TaskFailure.objects.filter(resolved=False).values("app_alias").annotate(
            n=Count("pk")).order_by():
        counts[row["app_alias"] or "unknown"] = row["n"]
    for alias, count in counts.items():
        scrape.add("task_failure_groups_open", (alias,), count)


def read_beat(scrape: Scrape, aliases: list[str]) -> None:
    """Whether each app has a beat leader row, and the age of its last tick."""
    from ..beat.health import app_health

    now = timezone.now()
    for alias, health in app_health(aliases).items():
        scrape.add("beat_leader", (alias,), int(health.leader is not None))
        if health.leader is not None:
            scrape.add("beat_last_tick_age_seconds", (alias,),
                       max(0.0, (now - health.leader.last_tick).total_seconds()))


#: source name -> reader; each runs once per scrape, in this order (a background
#: one starts at its turn, with what the ones before it found).
SOURCES: dict[str, Callable[[Scrape, list[str]], None]] = {
    "recorder": read_recorder,
    "workers": read_workers,      # uses the recorder's heartbeats
    "queues": read_queue_lengths,  # background from here, uses the readings
    "locks": read_locks,
    "lock_servers": read_lock_servers,  # background, the locks on lock servers
    "tasks": read_tasks,
    "failures": read_failures,
    "beat": read_beat,
}


#: Sources that wait on the network and never touch the database: they run in a
#: thread of their own while the others read the database.
BACKGROUND = frozenset({"queues", "lock_servers"})
#: Seconds a background source may take beyond ``METRICS["SERVER_TIMEOUT"]``.
BACKGROUND_GRACE = 1.0


class CeleryAdvCollector(Collector):
    """Reads every source once per :meth:`collect` call (one scrape)."""

    def __init__(self, aliases: Iterable[str] | None = None,
                 sources: dict[str, Callable[[Scrape, list[str]], None]] | None = None) -> None:
        self.aliases = list(aliases) if aliases is not None else None
        self.sources = SOURCES if sources is None else sources

    def describe(self) -> list[Metric]:
        # Nothing to announce: registering must not run a scrape.
        return []

    def collect(self) -> Iterator[Metric]:
        aliases = self.aliases if self.aliases is not None else list(apps)
        scrape = Scrape()
        background: list[tuple[str, threading.Thread, Scrape]] = []
        for source, read in self.sources.items():
            if source in BACKGROUND:
                # Network waits, no database: overlap them with the database sources.
                private = Scrape(readings=dict(scrape.readings),
                                 server_locks=list(scrape.server_locks))
                thread = threading.Thread(target=_run, args=(source, read, private, aliases),
                                          daemon=True, name=f"metrics-{source}")
                thread.start()
                background.append((source, thread, private))
            else:
                _run(source, read, scrape, aliases)
        deadline = time.monotonic() + float(conf.metrics("SERVER_TIMEOUT")) + BACKGROUND_GRACE
        for source, thread, private in background:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():  # a server that accepted and stalls: leave it behind
                scrape.add("scrape_error", (ALL_APPS, source, "Timeout"), 1)
            else:
                scrape.merge(private)
        scrape.family("scrape_error")  # present (empty) when nothing failed
        yield from scrape.families.values()


def _run(source: str, read: Callable[[Scrape, list[str]], None], scrape: Scrape,
         aliases: list[str]) -> None:
    started = time.perf_counter()
    try:
        read(scrape, aliases)
    except Exception as e:  # one source down never takes the others with it
        logger.warning("metrics: source %s failed: %s", source, type(e).__name__)
        scrape.error(ALL_APPS, source, e)
    scrape.add("scrape_duration_seconds", (ALL_APPS, source), time.perf_counter() - started)


def render(aliases: Iterable[str] | None = None) -> tuple[bytes, str]:
    """One scrape in Prometheus's text format (0.0.4): ``(body, content type)``.

    The text is written by :func:`exposition`, byte for byte what
    ``prometheus_client.generate_latest`` writes for a registry holding only
    this collector (a test compares the two), at a fraction of its cost: our
    label names are known to be valid, so only label values need escaping.
    """
    from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

    return exposition(CeleryAdvCollector(aliases).collect()), CONTENT_TYPE_PLAIN_0_0_4


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def exposition(families: Iterable[Metric]) -> bytes:
    """Families (counter, gauge, gauge histogram; no timestamps) in the text format.

    As ``generate_latest`` does it: a counter's lines are named ``<name>_total``;
    a gauge histogram is typed ``histogram`` with its ``_bucket`` lines, and its
    ``_gcount`` and ``_gsum`` follow as gauges of their own.
    """
    from prometheus_client.utils import floatToGoString

    def line(sample: Any) -> str:
        labels = ",".join(f'{key}="{_escape_value(str(sample.labels[key]))}"'
                          for key in sorted(sample.labels))
        labels = f"{{{labels}}}" if labels else ""
        return f"{sample.name}{labels} {floatToGoString(sample.value)}\n"

    out: list[str] = []
    for family in families:
        kind = {"gaugehistogram": "histogram"}.get(family.type, family.type)
        name = family.name + "_total" if kind == "counter" else family.name
        documentation = family.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {name} {documentation}\n# TYPE {name} {kind}\n")
        gauges: dict[str, list[str]] = {}
        for sample in family.samples:
            suffix = sample.name[len(family.name):]
            if family.type == "gaugehistogram" and suffix in ("_gcount", "_gsum"):
                gauges.setdefault(suffix, []).append(line(sample))
            else:
                out.append(line(sample))
        for suffix, lines in sorted(gauges.items()):
            out.append(f"# HELP {family.name}{suffix} {documentation}\n"
                       f"# TYPE {family.name}{suffix} gauge\n")
            out.extend(lines)
    return "".join(out).encode()
