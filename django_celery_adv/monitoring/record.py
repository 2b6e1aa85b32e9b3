"""The seen-workers record in the database: what every process knows about an app's workers.

Tables: :class:`~django_celery_adv.models.SeenWorker` (a row per worker: last
sign of life, last values) and :class:`~django_celery_adv.models.AppReading`
(a row per app: the latest reading and the reader claim). In the database,
not the Django cache, so a fresh ``celery_status`` process knows which
workers to wait for without a shared cache, and ``/metrics`` reads the last
values without broadcasting.

Cost: loading an app's record is two queries whatever the number of workers;
saving a reading is one bulk upsert (batches of 500 rows), one UPDATE and
one DELETE of the forgotten rows. Every function raises Django's
``DatabaseError`` on a database problem; :mod:`.shared` falls back to process
memory then.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import IntegrityError, connection, models, transaction

from .. import conf
from ..models import AppReading, SeenWorker
from .readings import AppStatus, Status, WorkerStatus, worker_from_values

#: Rows per INSERT of the bulk upsert.
BATCH_SIZE = 500


@dataclass
class Seen:
    """One SeenWorker row."""

    last_seen: datetime
    values_at: datetime | None
    values: dict[str, Any]


@dataclass
class Record:
    """An app's record: its latest reading (None if never read) and its workers."""

    alias: str
    reading: dict[str, Any] | None = None
    workers: dict[str, Seen] = field(default_factory=dict)

    @property
    def read_at(self) -> datetime | None:
        return self.reading["read_at"] if self.reading else None

    def expected(self) -> set[str]:
        """The workers that answered the latest reading: the next one waits for them."""
        read_at = self.read_at
        if read_at is None:
            return set()
        return {name for name, seen in self.workers.items() if seen.values_at == read_at}


def now() -> datetime:
    return datetime.now(UTC)


def load(alias: str) -> Record:
    """The record of ``alias``: two queries, workers forgotten after FORGET_AFTER left out."""
    since = now() - timedelta(seconds=conf.monitoring("FORGET_AFTER"))
    reading = AppReading.objects.filter(app_alias=alias).values(
        "read_at", "duration", "reachable", "error", "commands", "unread", "missing",
        "unread_by").first()
    rows = SeenWorker.objects.filter(app_alias=alias, last_seen__gte=since).values_list(
        "hostname", "last_seen", "values_at", "values")
    return Record(alias, reading if reading and reading["read_at"] else None,
                  {name: Seen(seen, at, values if isinstance(values, dict) else {})
                   for name, seen, at, values in rows})


def same_values(new: Mapping[str, Any], old: Mapping[str, Any], slack: float = 2.0) -> bool:
    """Equal but for start times at most ``slack`` seconds apart.

    A start time is derived: the reading's end minus the whole seconds of
    ``uptime`` the worker sent, at any moment of the reading. Two readings of
    one worker that did not restart give start times that differ by up to 2 s
    of truncation and rounding plus how long each reading took; a restart
    also shows in ``pid`` and the counters.
    """
    if new.keys() != old.keys():
        return False
    for key, value in new.items():
        if key == "started":
            if not isinstance(old[key], int | float) or abs(value - old[key]) > slack:
                return False
        elif value != old[key]:
            return False
    return True


def save(status: AppStatus, known: Record | None = None, token: str | None = None) -> None:
    """Store a fresh reading: its answering workers' values and its summary, and
    release the reader claim if it is still ``token``'s (a claim that expired and
    was taken by another process stays that process's).

    Workers whose values equal those in ``known`` (the record the reading
    started from) only get their times moved: those that answered the
    previous reading too in one UPDATE (by that reading's time, except the
    few that did not stay the same), the rest per 500 names; changed
    workers in one bulk upsert (batches of 500 rows). So a healthy, idle
    fleet is stored with the same statements at 10 or 2,000 workers.
    """
    changed: list[SeenWorker] = []
    unchanged: list[str] = []
    slack = 2.0 + status.duration + (known.reading["duration"] or 0.0
                                     if known and known.reading else 0.0)
    for worker in status.workers:
        if worker.values_at != status.read_at:
            continue  # silent now: its row keeps its last values
        values = worker.values()
        before = known.workers.get(worker.name) if known else None
        if before is not None and before.values_at is not None \
                and same_values(values, before.values, slack):
            unchanged.append(worker.name)
        else:
            changed.append(SeenWorker(app_alias=status.alias, hostname=worker.name,
                                      last_seen=status.read_at, values_at=status.read_at,
                                      values=values))
    upsert = {"update_conflicts": True, "update_fields": ["last_seen", "values_at", "values"]}
    if connection.features.supports_update_conflicts_with_target:
        upsert["unique_fields"] = ["app_alias", "hostname"]
    previous = known.read_at if known else None
    expected = known.expected() if known else set()
    same = set(unchanged) & expected
    exceptions = sorted(expected - same)
    rest = [name for name in unchanged if name not in same]
    times = {"last_seen": status.read_at, "values_at": status.read_at}
    with transaction.atomic():
        if changed:
            SeenWorker.objects.bulk_create(changed, batch_size=BATCH_SIZE, **upsert)
        if same and len(exceptions) <= BATCH_SIZE:
            SeenWorker.objects.filter(app_alias=status.alias, values_at=previous).exclude(
                hostname__in=exceptions).update(**times)
        else:
            rest += sorted(same)
        for start in range(0, len(rest), BATCH_SIZE):
            SeenWorker.objects.filter(app_alias=status.alias,
                                      hostname__in=rest[start:start + BATCH_SIZE]).update(**times)
        summary = {"read_at": status.read_at, "duration": status.duration,
                   "reachable": status.reachable, "error": status.error or "",
                   "commands": ",".join(status.commands), "unread": status.unread,
                   "missing": status.missing, "unread_by": status.unread_by}
        if not AppReading.objects.filter(app_alias=status.alias).update(**summary):
            try:
                with transaction.atomic():
                    AppReading.objects.create(app_alias=status.alias, **summary)
            except IntegrityError:  # created meanwhile by another process
                AppReading.objects.filter(app_alias=status.alias).update(**summary)
        if token:
            release(status.alias, token)
        forget_before = now() - timedelta(seconds=conf.monitoring("FORGET_AFTER"))
        SeenWorker.objects.filter(app_alias=status.alias, last_seen__lt=forget_before).delete()


def claim(alias: str, token: str, seconds: float) -> bool:
    """Become the one reader of ``alias`` for ``seconds`` unless someone else is (one UPDATE)."""
    moment = now()
    free = models.Q(reader_until__isnull=True) | models.Q(reader_until__lt=moment)
    until = moment + timedelta(seconds=seconds)
    if AppReading.objects.filter(free, app_alias=alias).update(reader=token, reader_until=until):
        return True
    if AppReading.objects.filter(app_alias=alias).exists():
        return False
    try:
        with transaction.atomic():
            AppReading.objects.create(app_alias=alias, reader=token, reader_until=until)
        return True
    except IntegrityError:  # another process created it first, and holds it
        return False


def release(alias: str, token: str) -> None:
    AppReading.objects.filter(app_alias=alias, reader=token).update(reader="",
                                                                     reader_until=None)


def reading_state(alias: str) -> tuple[datetime | None, datetime | None]:
    """(read_at, reader_until) of ``alias``: what a process waiting for a reader polls."""
    row = AppReading.objects.filter(app_alias=alias).values_list("read_at",
                                                                  "reader_until").first()
    return row if row else (None, None)


def mark_seen_many(alias: str, seen: Mapping[str, datetime]) -> None:
    """Record a sign of life (a heartbeat) of several workers; never moves one back in time.

    A few statements per 500 workers, not per worker: one SELECT of their
    rows, one ``bulk_update`` of those that move forward, one insert
    (conflicts ignored) of the new ones.
    """
    names = sorted(seen)
    for start in range(0, len(names), BATCH_SIZE):
        chunk = names[start:start + BATCH_SIZE]
        rows = {row.hostname: row for row in SeenWorker.objects.filter(
            app_alias=alias, hostname__in=chunk).only("id", "hostname", "last_seen")}
        forward = []
        for name, row in rows.items():
            if row.last_seen < seen[name]:
                row.last_seen = seen[name]
                forward.append(row)
        with transaction.atomic():
            if forward:
                SeenWorker.objects.bulk_update(forward, ["last_seen"])
            new = [SeenWorker(app_alias=alias, hostname=name, last_seen=seen[name])
                   for name in chunk if name not in rows]
            if new:  # a row created meanwhile (a reading) keeps its own time
                SeenWorker.objects.bulk_create(new, ignore_conflicts=True)


def forget(aliases: Iterable[str]) -> None:
    aliases = list(aliases)
    SeenWorker.objects.filter(app_alias__in=aliases).delete()
    AppReading.objects.filter(app_alias__in=aliases).delete()


# -- a status from the record -------------------------------------------------------------

def silent_status(seen_at: datetime | None, at: datetime, reachable: bool) -> Status:
    if not reachable:
        return Status.UNKNOWN
    if seen_at is not None and (at - seen_at).total_seconds() <= conf.monitoring("OFFLINE_AFTER"):
        return Status.NO_REPLY
    return Status.OFFLINE


def silent_workers(record: Record, at: datetime, reachable: bool, commands: list[str],
                   skip: Iterable[str] = ()) -> list[WorkerStatus]:
    """The record's workers not in ``skip``, as silent now: last values kept, with their age."""
    skip = set(skip)
    return [worker_from_values(name, silent_status(seen.last_seen, at, reachable), seen.values,
                               seen.last_seen, seen.values_at, list(commands))
            for name, seen in record.workers.items() if name not in skip]


def status_from_record(record: Record, broker: str) -> AppStatus | None:
    """The latest reading of ``record``'s app as stored (``shared=True``), or None if none."""
    reading = record.reading
    if reading is None:
        return None
    read_at = reading["read_at"]
    commands = [c for c in reading["commands"].split(",") if c]
    unread_by = reading["unread_by"] if isinstance(reading["unread_by"], dict) else {}
    answered = {name for name, seen in record.workers.items() if seen.values_at == read_at}
    workers = [worker_from_values(name, Status.ONLINE, seen.values, seen.last_seen,
                                  seen.values_at, list(unread_by.get(name, ())))
               for name, seen in record.workers.items() if name in answered]
    workers += silent_workers(record, read_at, reading["reachable"], commands, skip=answered)
    workers.sort(key=lambda worker: worker.name)
    return AppStatus(alias=record.alias, broker=broker, reachable=reading["reachable"],
                     error=reading["error"] or None, workers=workers, read_at=read_at,
                     duration=reading["duration"], commands=commands,
                     unread=reading["unread"], missing=reading["missing"],
                     unread_by=unread_by, shared=True)
