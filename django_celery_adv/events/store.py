"""The recorder's database side: batched upserts of task records, counters, pruning.

Guarantees:

* **Batched.** :func:`write_batch` writes any number of changed tasks with a
  fixed number of statements per 500 tasks (one ``SELECT`` of the stored
  rows, one upsert) plus two for the counters, in one transaction.
* **Order-independent.** Each change is merged into the stored row with
  :func:`.merge.merge`, the rule the recorder used in memory, so a late
  ``task-started`` never overwrites ``succeeded`` whatever the batches.
* **Readable anywhere.** Counters live in :class:`TaskRecorderStats` (one row per
  app), so ``/metrics`` and the workers page in other processes read them
  with one query (:func:`recorder_stats`, :func:`worker_counters`).

Error handling: database errors propagate to the caller (the recorder), which
keeps or drops the batch and counts what it dropped.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.db import connections, router, transaction
from django.utils import timezone

from ..models import TaskRecord, TaskRecorderStats
from .merge import RECORD_FIELDS, derive, merge

#: Tasks per statement (SQLite's variable limit is the tightest).
CHUNK = 500
#: ``task_counts`` keeps at most this many names per app; the rest count as "(other)".
MAX_TASK_NAMES = 1000
OTHER_NAME = "(other)"
#: ``workers`` keeps at most this many hostnames per app (the newest heartbeats).
MAX_WORKERS = 1000
_TIME_FIELDS = ("received_at", "started_at", "succeeded_at", "failed_at")
_TEXT_FIELDS = ("name", "worker", "args", "kwargs", "result", "exception", "traceback",
                "parent_id", "root_id")
_UPDATE_FIELDS = [f for f in (*RECORD_FIELDS, "state", "state_timestamp", "queue_wait",
                              "updated_at") if f not in ("app_alias", "task_id")]


def _to_epoch(value: datetime.datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _to_datetime(value: float | None) -> datetime.datetime | None:
    return datetime.datetime.fromtimestamp(value, tz=datetime.UTC) if value else None


def recorder_name() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


@dataclass
class BatchResult:
    """What one batch wrote: tasks, events, and per-name state counts."""

    tasks: int = 0
    events: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def _stored(alias: str, task_ids: list[str], using: str) -> dict[str, dict[str, Any]]:
    rows = TaskRecord.objects.using(using).filter(app_alias=alias, task_id__in=task_ids) \
        .values("task_id", "state", "state_timestamp", "queue_wait", *RECORD_FIELDS)
    stored = {}
    for row in rows:
        for key in _TIME_FIELDS:
            row[key] = _to_epoch(row[key])
        stored[row.pop("task_id")] = row
    return stored


def _upsert_sql(connection, rows: int) -> str:
    """An upsert of ``rows`` rows keyed by (app_alias, task_id), in this database's dialect.

    PostgreSQL takes one array per column (``unnest``): a statement of 24
    parameters whatever the row count, where a multi-row ``VALUES`` makes the
    driver split a query of 12,000 placeholders in Python.
    """
    quote = connection.ops.quote_name
    columns = ["app_alias", "task_id", *_UPDATE_FIELDS]
    names = ", ".join(quote(c) for c in columns)
    table = quote(TaskRecord._meta.db_table)
    if connection.vendor == "postgresql":
        arrays = ", ".join(f"%s::{TaskRecord._meta.get_field(c).db_type(connection)}[]"
                           for c in columns)
        head = f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays}) "
    else:
        values = "(" + ", ".join(["%s"] * len(columns)) + ")"
        head = f"INSERT INTO {table} ({names}) VALUES {', '.join([values] * rows)} "
    if connection.vendor == "mysql":
        return head + "ON DUPLICATE KEY UPDATE " + ", ".join(
            f"{quote(c)} = VALUES({quote(c)})" for c in _UPDATE_FIELDS)
    return head + f"ON CONFLICT ({quote('app_alias')}, {quote('task_id')}) DO UPDATE SET " + \
        ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in _UPDATE_FIELDS)


def _upsert(connection, rows: list[list[Any]]) -> None:
    """SQLite: ``executemany`` of a one-row statement (in-process, no round trips);
    PostgreSQL: one statement of column arrays; others: one multi-row statement."""
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.executemany(_upsert_sql(connection, 1), rows)
        elif connection.vendor == "postgresql":
            cursor.execute(_upsert_sql(connection, len(rows)),
                           [list(column) for column in zip(*rows, strict=True)])
        else:
            cursor.execute(_upsert_sql(connection, len(rows)),
                           [value for row in rows for value in row])


def write_batch(alias: str, changes: Mapping[str, dict[str, Any]]) -> BatchResult:
    """Merge ``changes`` (task id -> change from :func:`.merge.apply_event`) into the table.

    A change may carry ``_events`` (how many events it folds) and ``_states``
    (the state of each event, for the per-name counters); both are ignored by
    the table. Per 500 tasks: one ``SELECT`` of the stored rows and one upsert
    (the ORM's ``bulk_create`` spends more time building its statement than the
    database takes to run it).
    """
    using = router.db_for_write(TaskRecord)
    connection = connections[using]
    adapt = connection.ops.adapt_datetimefield_value
    now = adapt(timezone.now())
    result = BatchResult()
    ids = list(changes)
    with transaction.atomic(using=using):
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            stored = _stored(alias, chunk, using)
            rows = []
            for task_id in chunk:
                change = changes[task_id]
                record = stored.get(task_id, {})
                fields = {k: v for k, v in change.items() if k in RECORD_FIELDS}
                merge(record, change.get("state"), change.get("state_timestamp") or 0.0, fields)
                derive(record)
                row = [alias, task_id]
                for key in _UPDATE_FIELDS:
                    value = record.get(key)
                    if key in _TIME_FIELDS:
                        value = adapt(_to_datetime(value))
                    elif key in _TEXT_FIELDS:
                        value = value or ""
                    elif key in ("retries", "state_timestamp"):
                        value = value or 0
                    elif key == "retryable":
                        value = bool(value)
                    elif key == "state":
                        value = value or TaskRecord.State.PENDING
                    elif key == "updated_at":
                        value = now
                    row.append(value)
                rows.append(row)
                result.events += change.get("_events", 1)
                name = record.get("name") or "?"
                for state in change.get("_states", ()):
                    per_name = result.counts.setdefault(name, {})
                    per_name[state] = per_name.get(state, 0) + 1
            if rows:
                _upsert(connection, rows)
            result.tasks += len(rows)
    return result


def _add_counts(total: dict[str, dict[str, int]], delta: Mapping[str, Mapping[str, int]]) -> None:
    for name, per_state in delta.items():
        if name not in total and len(total) >= MAX_TASK_NAMES:
            name = OTHER_NAME
        bucket = total.setdefault(name, {})
        for state, count in per_state.items():
            bucket[state] = bucket.get(state, 0) + count


def update_stats(alias: str, *, seen: int = 0, written: int = 0, dropped: int = 0,
                 last_event_at: float | None = None, wrote: bool = False,
                 task_counts: Mapping[str, Mapping[str, int]] | None = None,
                 worker_counts: Mapping[str, Mapping[str, int]] | None = None,
                 heartbeats: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Add deltas to the app's :class:`TaskRecorderStats` row (two statements)."""
    using = router.db_for_write(TaskRecorderStats)
    with transaction.atomic(using=using):
        stats, _ = TaskRecorderStats.objects.using(using).select_for_update() \
            .get_or_create(app_alias=alias)
        stats.events_seen += seen
        stats.events_written += written
        stats.events_dropped += dropped
        if last_event_at:
            stats.last_event_at = _to_datetime(last_event_at)
        if wrote:
            stats.last_write_at = timezone.now()
        if task_counts:
            _add_counts(stats.task_counts, task_counts)
        workers = stats.workers
        for hostname, counts in (worker_counts or {}).items():
            entry = workers.setdefault(hostname, {})
            for key, count in counts.items():
                entry[key] = entry.get(key, 0) + count
        for hostname, beat in (heartbeats or {}).items():
            workers.setdefault(hostname, {}).update(beat)
        if len(workers) > MAX_WORKERS:
            newest = sorted(workers, key=lambda h: workers[h].get("heartbeat_at") or 0)
            for hostname in newest[:len(workers) - MAX_WORKERS]:
                del workers[hostname]
        stats.recorder = recorder_name()
        stats.save(using=using)


def recorder_stats(alias: str | None = None) -> dict[str, TaskRecorderStats]:
    """alias -> its counters row (one query); apps never recorded are absent."""
    rows = TaskRecorderStats.objects.all()
    if alias is not None:
        rows = rows.filter(app_alias=alias)
    return {row.app_alias: row for row in rows}


@dataclass(frozen=True)
class WorkerCounters:
    """One worker as its events tell it (Flower's split), for the workers page.

    Counts are cumulative over every event the recorder saw; ``active``,
    ``loadavg`` and ``heartbeat_at`` come from the newest heartbeat (``None``
    if no heartbeat was seen).
    """

    hostname: str
    processed: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    active: int | None = None
    loadavg: tuple[float, ...] | None = None
    heartbeat_at: datetime.datetime | None = None
    offline: bool = False


def worker_counters(alias: str) -> dict[str, WorkerCounters]:
    """hostname -> :class:`WorkerCounters` of app ``alias`` (one query; {} if none)."""
    return worker_counters_by_app([alias]).get(alias, {})


def worker_counters_by_app(aliases: Iterable[str]) -> dict[str, dict[str, WorkerCounters]]:
    """alias -> hostname -> :class:`WorkerCounters` of several apps in one query
    (an app the recorder never wrote for is missing)."""
    result: dict[str, dict[str, WorkerCounters]] = {}
    for alias, workers in TaskRecorderStats.objects.filter(
            app_alias__in=list(aliases)).values_list("app_alias", "workers"):
        result[alias] = {hostname: _counters(hostname, entry)
                         for hostname, entry in (workers or {}).items()}
    return result


def _counters(hostname: str, entry: dict[str, Any]) -> WorkerCounters:
    loadavg = entry.get("loadavg")
    return WorkerCounters(
        hostname=hostname, processed=entry.get("processed", 0),
        succeeded=entry.get("succeeded", 0), failed=entry.get("failed", 0),
        retried=entry.get("retried", 0), active=entry.get("active"),
        loadavg=tuple(loadavg) if loadavg else None,
        heartbeat_at=_to_datetime(entry.get("heartbeat_at")),
        offline=bool(entry.get("offline")))


# -- retention -----------------------------------------------------------------------

@dataclass
class PruneResult:
    by_age: int = 0
    by_count: int = 0


def prune(alias: str, *, days: float | None, keep: int | None,
          dry_run: bool = False) -> PruneResult:
    """Delete the app's records not updated for ``days`` and all but the newest ``keep``.

    ``None`` leaves that limit off. One or two ``DELETE`` statements (no
    per-row work): the records have no relations.
    """
    result = PruneResult()
    rows = TaskRecord.objects.filter(app_alias=alias)
    if days is not None:
        old = rows.filter(updated_at__lt=timezone.now() - datetime.timedelta(days=days))
        result.by_age = old.count() if dry_run else old.delete()[0]
    if keep is not None:
        boundary = rows.order_by("-id").values_list("id", flat=True)[keep:keep + 1].first() \
            if keep else rows.order_by("-id").values_list("id", flat=True).first()
        if boundary is not None:
            extra = rows.filter(id__lte=boundary) if keep else rows
            result.by_count = extra.count() if dry_run else extra.delete()[0]
    return result


def prune_all(aliases: Iterable[str], settings_for, **overrides: Any) -> dict[str, PruneResult]:
    """:func:`prune` for each alias with its retention settings (``overrides`` win)."""
    results = {}
    for alias in aliases:
        config = settings_for(alias)
        days = overrides.get("days", config["RETENTION_DAYS"])
        keep = overrides.get("keep", config["RETENTION_COUNT"])
        results[alias] = prune(alias, days=days, keep=keep,
                               dry_run=overrides.get("dry_run", False))
    return results
