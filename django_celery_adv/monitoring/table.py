"""The workers table of the admin page: summary counts, filters, cells. Pure functions.

At 2,000 workers the page shows per app a summary line first (counts per
status, complete or partial), then one page of rows. Filtering is one pass
over the reading in memory; only the rows of the shown page get cells built.
Nothing here queries the database or a broker.

A cell says which of four things it shows (``Cell.kind``):

* ``value`` -- read in this reading;
* ``stale`` -- the last known value of a worker silent now (its age is on the row);
* ``unread`` -- the reply that carries it was not read in time;
* ``unsent`` -- the reply came without it ("?");
* ``unasked`` -- this reading did not ask for it ("-").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.utils.translation import gettext as _
from django.utils.translation import gettext_noop

from .readings import AppStatus, Status, WorkerStatus

#: Columns of the table after name, app and status: field, label.
COLUMNS = (("concurrency", gettext_noop("Concurrency")),
           ("processed", gettext_noop("Processed tasks")), ("queues", gettext_noop("Queues")))


#: The facts of a worker's page: field, label.
FACTS = (("pool", gettext_noop("Pool")), ("concurrency", gettext_noop("Concurrency")),
         ("prefetch", gettext_noop("Prefetch count")),
         ("processed", gettext_noop("Processed tasks")),
         ("completed", gettext_noop("Completed tasks")),
         ("running", gettext_noop("Running tasks")),
         ("pid", gettext_noop("PID")), ("queues", gettext_noop("Queues")))


@dataclass
class Filters:
    """What the operator filters on; empty strings match everything."""

    app: str = ""
    state: str = ""
    queue: str = ""
    host: str = ""

    @classmethod
    def from_query(cls, query: Mapping[str, Any]) -> Filters:
        def text(key: str) -> str:
            return str(query.get(key, "") or "").strip()[:200]

        state = text("state")
        return cls(app=text("app"), queue=text("queue"), host=text("host"),
                   state=state if state in {s.value for s in Status} else "")

    def active(self) -> bool:
        return any((self.app, self.state, self.queue, self.host))

    def match(self, status: AppStatus, worker: WorkerStatus) -> bool:
        return ((not self.app or status.alias == self.app)
                and (not self.state or worker.status == self.state)
                and (not self.queue or self.queue in (worker.queues or ()))
                and (not self.host or self.host.lower() in worker.name.lower()))

    def query(self, **changes: str) -> str:
        """The URL query string of these filters (``page`` and the like added)."""
        from urllib.parse import urlencode

        values = {"app": self.app, "state": self.state, "queue": self.queue,
                  "host": self.host, **changes}
        return urlencode({key: value for key, value in values.items() if value})


@dataclass
class Summary:
    """One app's line above the table."""

    status: AppStatus
    counts: dict[str, int]
    #: Why the health check would fail (None: healthy), with the silent window applied.
    problem: str | None
    tolerated: int

    @property
    def no_reply(self) -> int:
        return self.counts[Status.NO_REPLY.value]


def summaries(statuses: Iterable[AppStatus], window: float) -> list[Summary]:
    return [Summary(status, status.counts(), status.problem(window=window),
                    len(status.tolerated(window))) for status in statuses]


def matching(statuses: Iterable[AppStatus], filters: Filters) -> list[tuple[AppStatus,
                                                                          WorkerStatus]]:
    return [(status, worker) for status in statuses for worker in status.workers
            if filters.match(status, worker)]


def queue_names(statuses: Iterable[AppStatus]) -> list[str]:
    return sorted({queue for status in statuses for worker in status.workers
                   for queue in worker.queues or ()})


@dataclass
class Cell:
    text: str
    kind: str


@dataclass
class Row:
    status: AppStatus
    worker: WorkerStatus
    cells: list[Cell] = field(default_factory=list)
    #: Seconds since the values shown were read, when older than the reading.
    values_age: float | None = None
    #: What the event recorder counted for this worker (succeeded / failed /
    #: retried / processed, load average), when it runs: any object with those
    #: attributes (``events.WorkerCounters``); ``None`` without events.
    events: Any = None


def cell(worker: WorkerStatus, name: str, commands: list[str], online: bool) -> Cell:
    value = getattr(worker, name)
    if value is not None:
        text = ", ".join(value) if isinstance(value, list) else str(value)
        return Cell(text or "-", "value" if online else "stale")
    if worker.not_read(name):
        return Cell(_("not read"), "unread")
    if worker.not_asked(name, commands):
        return Cell("-", "unasked")
    return Cell("?", "unsent")


def rows(page: Iterable[tuple[AppStatus, WorkerStatus]], now: datetime,
         counters: Mapping[str, Mapping[str, Any]] | None = None) -> list[Row]:
    """Cells for the rows of one page only; ``counters`` is alias -> hostname ->
    the recorder's counts (read by the caller, one query per app)."""
    counters = counters or {}
    built = []
    for status, worker in page:
        current = worker.values_at is not None and worker.values_at == status.read_at
        built.append(Row(status, worker, [cell(worker, name, status.commands, current)
                                          for name, _label in COLUMNS],
                         None if current else worker.values_age(now),
                         counters.get(status.alias, {}).get(worker.name)))
    return built


def facts(worker: WorkerStatus, commands: list[str], current: bool) -> list[tuple[str, Cell]]:
    """(label, cell) for a worker's page; ``current``: read now, not from the record."""
    return [(label, cell(worker, name, commands, current)) for name, label in FACTS]
