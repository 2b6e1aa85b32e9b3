"""What one reading of one app says: plain dataclasses, built from replies or from the record.

A field is ``None`` when it is not known. Why it is not known is kept apart,
because the operator must be able to tell the two cases on screen:

* the worker did not send it (its reply came, without the field): shown "?";
* its reply was not read in this reading (timeout, busy worker): the command
  is listed in :attr:`WorkerStatus.unread`, shown "not read" -- and when an
  earlier reading had the value, that value is shown instead, with its age
  (:attr:`WorkerStatus.values_at`).

Nothing here talks to a broker or a database.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.utils.translation import gettext as _

from ..masking import mask_text

#: Task arguments longer than this (after masking) are cut with an ellipsis.
ARGS_LIMIT = 200

#: Which inspect command fills which WorkerStatus fields.
FIELDS_BY_COMMAND: dict[str, tuple[str, ...]] = {
    "ping": ("ping",),
    "stats": ("concurrency", "pool", "uptime", "prefetch", "pid", "processed", "completed"),
    "active": ("running", "active", "completed"),
    "active_queues": ("queues",),
}
#: The fields carried from one reading to the next in the seen-workers record.
VALUE_FIELDS = ("ping", "concurrency", "processed", "completed", "running", "queues", "active",
                "pool", "uptime", "prefetch", "pid")


class Status(enum.StrEnum):
    """How a worker stands in one reading."""

    ONLINE = "online"        #: answered this reading
    NO_REPLY = "no reply"    #: seen within OFFLINE_AFTER seconds, silent now
    OFFLINE = "offline"      #: seen within FORGET_AFTER seconds, silent since OFFLINE_AFTER
    UNKNOWN = "unknown"      #: known, but the broker could not be asked


@dataclass
class ActiveTask:
    """A task a worker is executing now."""

    id: str
    name: str
    #: ``argsrepr`` / ``kwargsrepr``, masked and cut to ARGS_LIMIT characters.
    args: str
    kwargs: str
    worker_pid: int | None
    started: datetime | None
    #: Seconds since ``started`` at the time of the reading.
    runtime: float | None


@dataclass
class WorkerStatus:
    """One worker of one app; ``None`` in a field means "not known" (see the module doc)."""

    name: str
    status: Status
    #: The ping reply ("pong"), only when ``ping`` was asked for.
    ping: str | None = None
    concurrency: int | None = None
    #: Tasks the worker started since it started (Celery's ``stats()["total"]``).
    processed: int | None = None
    #: Tasks finished since the worker started (needs ``active``). Celery's ``stats()["total"]``
    #: counts a task when it starts, so the ones running now are taken off.
    completed: int | None = None
    running: int | None = None
    queues: list[str] | None = None
    active: list[ActiveTask] | None = None
    #: Short pool name: prefork, threads, solo, eventlet, gevent ...
    pool: str | None = None
    #: Seconds since the worker started (at ``values_at``).
    uptime: float | None = None
    prefetch: int | None = None
    pid: int | None = None
    #: Last sign of life: a reply, or a heartbeat event (``mark_seen``).
    last_seen: datetime | None = None
    #: When the values above were read (earlier than the reading when the
    #: worker is silent now and they come from the record); None: never.
    values_at: datetime | None = None
    #: Commands asked in this reading whose reply was not read.
    unread: list[str] = field(default_factory=list)

    @property
    def online(self) -> bool:
        return self.status == Status.ONLINE

    def not_asked(self, name: str, commands: Iterable[str]) -> bool:
        """True when no command of ``commands`` (what the reading asked) fills ``name``."""
        return not any(name in FIELDS_BY_COMMAND.get(command, ()) for command in commands)

    def not_read(self, name: str) -> bool:
        """True when field ``name`` is unknown because a reply was not read."""
        return any(name in FIELDS_BY_COMMAND.get(command, ()) for command in self.unread)

    def values_age(self, now: datetime) -> float | None:
        """Seconds since the values were read, or None if never."""
        return None if self.values_at is None else max(0.0, (now - self.values_at).total_seconds())

    def values(self) -> dict[str, Any]:
        """The fields kept in the seen-workers record, JSON-ready.

        ``uptime`` is kept as ``started`` (epoch seconds, whole), so that a
        worker whose values did not change has the same values next time.
        """
        values = {name: getattr(self, name) for name in VALUE_FIELDS
                  if name not in ("active", "uptime") and getattr(self, name) is not None}
        if self.uptime is not None and self.values_at is not None:
            values["started"] = round(self.values_at.timestamp() - self.uptime)
        if self.active is not None:
            values["active"] = [{
                "id": task.id, "name": task.name, "args": task.args, "kwargs": task.kwargs,
                "worker_pid": task.worker_pid, "runtime": task.runtime,
                "started": task.started.isoformat() if task.started else None}
                for task in self.active]
        return values


@dataclass
class AppStatus:
    """One app's reading: its broker, whether it answered, its workers, and how complete it is."""

    alias: str
    #: The broker URL with passwords masked.
    broker: str
    reachable: bool
    error: str | None
    workers: list[WorkerStatus] = field(default_factory=list)
    read_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: Seconds the reading took.
    duration: float = 0.0
    #: The commands this reading asked.
    commands: list[str] = field(default_factory=list)
    #: Replies asked for and not read (a worker x command each): those a worker
    #: that answered did not send in time, and all of a "no reply" worker's.
    unread: int = 0
    #: Workers believed alive ("no reply": seen within OFFLINE_AFTER) that sent nothing.
    missing: int = 0
    #: worker -> commands it owes: the replies counted in ``unread``.
    unread_by: dict[str, list[str]] = field(default_factory=dict)
    #: True when this reading was taken by another view or process and reused.
    shared: bool = False

    @property
    def partial(self) -> bool:
        """True when some asked reply was not read: the reading is incomplete."""
        return self.unread > 0

    @property
    def online(self) -> list[WorkerStatus]:
        return [worker for worker in self.workers if worker.online]

    def worker(self, name: str) -> WorkerStatus | None:
        return next((worker for worker in self.workers if worker.name == name), None)

    def counts(self) -> dict[str, int]:
        """Workers per status, every status present (0 when none)."""
        counts = dict.fromkeys((status.value for status in Status), 0)
        for worker in self.workers:
            counts[worker.status.value] += 1
        return counts

    def tolerated(self, window: float) -> list[WorkerStatus]:
        """Silent workers seen within ``window`` seconds of the reading (busy, not dead)."""
        return [worker for worker in self.workers
                if worker.status == Status.NO_REPLY and worker.last_seen is not None
                and (self.read_at - worker.last_seen).total_seconds() <= window]

    def problem(self, *, allow_partial: bool = False, window: float = 0.0) -> str | None:
        """Why this reading is not healthy, or None.

        Healthy: the broker answered; at least one worker answered or is
        silent but seen within ``window`` seconds; and every asked reply was
        read, except those of such tolerated silent workers (``allow_partial``
        accepts any partial reading).
        """
        if not self.reachable:
            return _("unreachable")
        tolerated = self.tolerated(window)
        if not self.online and not tolerated:
            return _("no worker online")
        if not allow_partial:
            excused = sum(len(self.unread_by.get(worker.name, ())) for worker in tolerated)
            if self.unread - excused > 0:
                return _("partial reading: %(count)d replies not read") % {
                    "count": self.unread - excused}
        return None

    @property
    def healthy(self) -> bool:
        """Reachable, a worker online, complete (no tolerance): see :meth:`problem`."""
        return self.problem() is None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 strings, statuses as their text."""
        data = _jsonable(asdict(self))
        data["partial"] = self.partial
        return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable(asdict(value))
    return value


# -- from replies ----------------------------------------------------------------------

def _short(text: Any, secrets: Iterable[str]) -> str:
    text = mask_text(text if isinstance(text, str) else repr(text), secrets)
    return text if len(text) <= ARGS_LIMIT else text[:ARGS_LIMIT - 1] + "\u2026"


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _pool_name(pool: Mapping[str, Any]) -> str | None:
    implementation = pool.get("implementation")
    if not isinstance(implementation, str):
        return None
    # "celery.concurrency.prefork:TaskPool" -> "prefork"
    return implementation.partition(":")[0].rpartition(".")[2] or implementation


def _active_task(info: Mapping[str, Any], now: float, secrets: list[str]) -> ActiveTask:
    time_start = info.get("time_start")
    started = runtime = None
    if isinstance(time_start, int | float) and time_start > 0:
        started = datetime.fromtimestamp(time_start, UTC)
        runtime = max(0.0, now - time_start)
    return ActiveTask(
        id=str(info.get("id", "")), name=str(info.get("name") or info.get("type") or "?"),
        args=_short(info.get("args", ""), secrets), kwargs=_short(info.get("kwargs", ""), secrets),
        worker_pid=_int(info.get("worker_pid")), started=started, runtime=runtime)


def build_worker(name: str, replies: Mapping[str, Mapping[str, Any]], now: float,
                 secrets: list[str], read_at: datetime) -> WorkerStatus:
    """A worker that answered this reading, from whatever it answered."""
    worker = WorkerStatus(name=name, status=Status.ONLINE, last_seen=read_at, values_at=read_at,
                          unread=[command for command, by_node in replies.items()
                                  if name not in by_node])
    pong = replies.get("ping", {}).get(name)
    if isinstance(pong, dict):
        worker.ping = str(pong.get("ok", pong))
    started_tasks: int | None = None
    stats = replies.get("stats", {}).get(name)
    if isinstance(stats, dict):
        pool = stats.get("pool") if isinstance(stats.get("pool"), dict) else {}
        worker.concurrency = _int(pool.get("max-concurrency"))
        worker.pool = _pool_name(pool)
        total = stats.get("total")
        if isinstance(total, dict):
            started_tasks = sum(v for v in total.values() if isinstance(v, int))
            worker.processed = started_tasks
        uptime = stats.get("uptime")
        worker.uptime = uptime if isinstance(uptime, int | float) else None
        worker.prefetch = _int(stats.get("prefetch_count"))
        worker.pid = _int(stats.get("pid"))
    active = replies.get("active", {}).get(name)
    if isinstance(active, list):
        worker.active = [_active_task(info, now, secrets) for info in active
                         if isinstance(info, dict)]
        worker.running = len(worker.active)
    if started_tasks is not None and worker.running is not None:
        worker.completed = max(0, started_tasks - worker.running)
    queues = replies.get("active_queues", {}).get(name)
    if isinstance(queues, list):
        worker.queues = sorted(str(queue.get("name")) for queue in queues
                               if isinstance(queue, dict) and queue.get("name"))
    return worker


# -- from the record -------------------------------------------------------------------

def _datetime(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def worker_from_values(name: str, status: Status, values: Mapping[str, Any],
                       last_seen: datetime | None, values_at: datetime | None,
                       unread: list[str]) -> WorkerStatus:
    """A worker rebuilt from the seen-workers record (``values()`` of an earlier reading)."""
    worker = WorkerStatus(name=name, status=status, last_seen=last_seen, values_at=values_at,
                          unread=list(unread))
    for key in VALUE_FIELDS:
        if key in values and key not in ("active", "uptime"):
            setattr(worker, key, values[key])
    started = values.get("started")
    if isinstance(started, int | float) and values_at is not None:
        worker.uptime = max(0.0, values_at.timestamp() - started)
    active = values.get("active")
    if isinstance(active, list):
        worker.active = [ActiveTask(
            id=str(task.get("id", "")), name=str(task.get("name", "?")),
            args=str(task.get("args", "")), kwargs=str(task.get("kwargs", "")),
            worker_pid=_int(task.get("worker_pid")), started=_datetime(task.get("started")),
            runtime=task.get("runtime") if isinstance(task.get("runtime"), int | float)
            else None) for task in active if isinstance(task, dict)]
    return worker
