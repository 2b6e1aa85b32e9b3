"""One reading shared by every view and process: reuse it while young, one reader per app.

:func:`inspect_all` is what pages, ``celery_status`` and the metrics view
call. Per app it:

1. loads the seen-workers record (:mod:`.record`, two queries);
2. reuses the stored reading if it is younger than
   ``MONITORING["READING_MAX_AGE"]`` seconds and asked at least the same
   commands (``shared=True``, no broadcast);
3. else (``max_age=0`` included) claims the app's reader row (one
   conditional UPDATE on ``AppReading``; the claim lasts the timeout plus
   :data:`HARD_GRACE` and is released when the reading is stored). The
   claimer broadcasts; a
   process that finds the claim taken polls the row every
   :data:`POLL_INTERVAL` seconds and uses the reading the claimer stores, or
   reads itself when the claim expires unanswered (a claimer that died).
   A database row rather than a lock backend: the row is there anyway, it
   needs no lock server, and a dead claimer costs one timeout, not a TTL.
4. stores the new reading (workers' values, summary) for the others.

Database access happens in the caller's thread only. A database that fails
(down, not migrated) does not break monitoring: the record falls back to
this process's memory, as if every process were alone.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from .. import conf
from ..masking import mask_text, mask_url, url_secrets
from ..registry import apps
from . import record as store
from .collect import collect
from .readings import AppStatus, Status, WorkerStatus, build_worker

logger = logging.getLogger(__name__)

#: Seconds a reading may overrun its timeout before it is abandoned.
HARD_GRACE = 0.75
#: Seconds between two looks at a reader claim held by another process.
POLL_INTERVAL = 0.03

#: The commands of a table reading: liveness and the table from ``stats``,
#: queues from ``active_queues``. No ``ping``: any reply proves liveness.
#: No ``active``: at 2,000 workers its replies (task lists) took the reading
#: from 0.34 s to 0.62 s (README, Monitoring); the task lists are read for
#: one worker on its page (:func:`read_worker`) or asked for explicitly
#: (:data:`FULL_COMMANDS`, ``celery_status active``), as Flower does.
COMMANDS: dict[str, dict[str, Any]] = {
    "stats": {},
    "active_queues": {},
}
#: A reading with the running tasks of every worker.
FULL_COMMANDS: dict[str, dict[str, Any]] = {
    "stats": {},
    # safe=True: the producer's argsrepr/kwargsrepr strings, never unpickled
    # objects, and a task that hides its arguments that way stays hidden here.
    "active": {"safe": True},
    "active_queues": {},
}

_memory: dict[str, store.Record] = {}
_memory_lock = threading.Lock()


def broker_url(app: Any) -> str | list[str] | None:
    return app.conf.broker_write_url or app.conf.broker_url


def app_secrets(app: Any) -> list[str]:
    """Passwords in the app's broker settings: never to be shown, even bare."""
    found = url_secrets(broker_url(app))
    if app.conf.broker_password:
        found.append(str(app.conf.broker_password))
    return found


def masked_broker(alias: str) -> str:
    return mask_url(broker_url(apps[alias])) or "(Celery default)"


# -- reading one app ------------------------------------------------------------------

def read_worker(alias: str, name: str, timeout: float | None = None) -> WorkerStatus | None:
    """One worker now, with its running tasks (:data:`FULL_COMMANDS`), asked alone.

    Sent with ``destination=[name]``, so only that worker answers and the
    reading ends when it has. None when it did not answer in ``timeout`` (or
    the broker failed): the caller shows the record's last values instead.
    Nothing is stored.
    """
    app = apps[alias]
    timeout = float(conf.get("INSPECT_TIMEOUT") if timeout is None else timeout)
    try:
        tally = collect(app, {name}, timeout, FULL_COMMANDS, grace=0.0, destination=[name])
    except Exception:  # the page says "no reply" and shows the last values
        return None
    if name not in tally.answered:
        return None
    read_at = datetime.now(UTC)
    return build_worker(name, tally.replies, read_at.timestamp(), app_secrets(app), read_at)


def read_app(alias: str, timeout: float, known: store.Record,
             commands: Mapping[str, Mapping[str, Any]] = COMMANDS) -> AppStatus:
    """Broadcast to one app and build its status; never raises for a broker problem."""
    app = apps[alias]
    secrets = app_secrets(app)
    started = time.monotonic()
    status = AppStatus(alias=alias, broker=masked_broker(alias), reachable=True, error=None,
                       commands=list(commands))
    expected = known.expected()
    tally = None
    try:
        tally = collect(app, expected, timeout, commands)
    except Exception as e:  # any broker/client failure is this app's status, not ours
        status.reachable = False
        status.error = mask_text(f"{type(e).__name__}: {e}", secrets)
    status.read_at = read_at = datetime.now(UTC)
    now = read_at.timestamp()
    workers = {}
    if tally is not None:
        for name in tally.answered:
            workers[name] = build_worker(name, tally.replies, now, secrets, read_at)
            if workers[name].unread:  # answered part of what was asked
                status.unread_by[name] = list(workers[name].unread)
    silent = store.silent_workers(known, read_at, status.reachable, list(commands),
                                  skip=workers)
    # Unread, too: every reply of a worker believed alive ("no reply": seen
    # within OFFLINE_AFTER) that sent nothing, waited for or not.
    missing = [worker for worker in silent if worker.status == Status.NO_REPLY]
    status.unread_by.update({worker.name: list(commands) for worker in missing})
    status.unread = sum(len(owed) for owed in status.unread_by.values())
    status.missing = len(missing)
    workers.update({worker.name: worker for worker in silent})
    status.workers = sorted(workers.values(), key=lambda worker: worker.name)
    status.duration = time.monotonic() - started
    return status


def _unreachable(alias: str, error: str, known: store.Record, commands: list[str],
                 duration: float = 0.0) -> AppStatus:
    status = AppStatus(alias=alias, broker=masked_broker(alias), reachable=False,
                       error=mask_text(error, app_secrets(apps[alias])), duration=duration,
                       commands=commands)
    status.workers = sorted(store.silent_workers(known, status.read_at, False, commands),
                            key=lambda worker: worker.name)
    return status


# -- the record, with the memory fallback -------------------------------------------------

def _db(what: str, function: Any, *args: Any, default: Any = None) -> Any:
    try:
        return function(*args)
    except Exception as e:  # the record is an optimisation: monitoring goes on without it
        logger.warning("monitoring: seen-workers record: cannot %s: %s", what, e)
        return default


def _remember(status: AppStatus, known: store.Record) -> None:
    workers = dict(known.workers)
    for worker in status.workers:
        if worker.values_at == status.read_at:
            workers[worker.name] = store.Seen(status.read_at, status.read_at, worker.values())
    reading = {"read_at": status.read_at, "duration": status.duration,
               "reachable": status.reachable, "error": status.error or "",
               "commands": ",".join(status.commands), "unread": status.unread,
               "missing": status.missing, "unread_by": status.unread_by}
    with _memory_lock:
        _memory[status.alias] = store.Record(status.alias, reading, workers)


def _load(alias: str) -> tuple[store.Record, bool]:
    """(record, from the database?)."""
    loaded = _db("load", store.load, alias)
    if loaded is not None:
        return loaded, True
    with _memory_lock:
        return _memory.get(alias) or store.Record(alias), False


def _fresh(known: store.Record, max_age: float, commands: Iterable[str]) -> bool:
    reading = known.reading
    if reading is None or max_age <= 0:
        return False
    age = (datetime.now(UTC) - reading["read_at"]).total_seconds()
    return age <= max_age and _covers(known, commands)


def _covers(known: store.Record | None, commands: Iterable[str]) -> bool:
    """True when ``known``'s reading asked at least ``commands`` (else it lacks fields)."""
    reading = known.reading if known is not None else None
    return reading is not None and set(commands) <= set(reading["commands"].split(","))


# -- every app ------------------------------------------------------------------------

def inspect_all(aliases: Iterable[str] | None = None, timeout: float | None = None, *,
                max_age: float | None = None,
                commands: Mapping[str, Mapping[str, Any]] | None = None
                ) -> dict[str, AppStatus]:
    """Read every app in ``aliases`` (default: all configured) concurrently.

    Returns alias -> :class:`AppStatus` in the order asked. ``timeout``
    defaults to ``INSPECT_TIMEOUT``; ``max_age`` (seconds) to
    ``MONITORING["READING_MAX_AGE"]`` -- 0 forces a broadcast. An alias that
    is not configured raises :class:`~.exceptions.ImproperlyConfiguredApp`
    before anything is sent; broker and database problems never raise.
    """
    timeout = float(conf.get("INSPECT_TIMEOUT") if timeout is None else timeout)
    max_age = float(conf.monitoring("READING_MAX_AGE") if max_age is None else max_age)
    commands = dict(COMMANDS if commands is None else commands)
    aliases = list(dict.fromkeys(aliases if aliases is not None else apps))
    for alias in aliases:
        apps[alias]  # a configuration error is raised here, in the caller's thread
    token = uuid.uuid4().hex
    hard_deadline = time.monotonic() + timeout + HARD_GRACE
    records: dict[str, store.Record] = {}
    in_db: dict[str, bool] = {}
    results: dict[str, AppStatus] = {}
    threads: dict[str, threading.Thread] = {}
    waiting: list[str] = []

    def run(alias: str, seconds: float) -> None:
        try:
            results[alias] = read_app(alias, seconds, records[alias], commands)
        except Exception as e:  # a bug or odd settings: still one app's error, not a 500
            results[alias] = _unreachable(alias, f"{type(e).__name__}: {e}", records[alias],
                                          list(commands))

    def start(alias: str, seconds: float) -> None:
        threads[alias] = thread = threading.Thread(
            target=run, args=(alias, seconds), daemon=True, name=f"inspect-{alias}")
        thread.start()

    for alias in aliases:
        records[alias], in_db[alias] = _load(alias)
        if _fresh(records[alias], max_age, commands):
            shared = store.status_from_record(records[alias], masked_broker(alias))
            if shared is not None:
                results[alias] = shared
                continue
        if in_db[alias] and not _db(
                "claim", store.claim, alias, token, timeout + HARD_GRACE, default=True):
            waiting.append(alias)  # another process is reading it now
        else:
            start(alias, timeout)

    while waiting and time.monotonic() < hard_deadline:
        time.sleep(POLL_INTERVAL)
        for alias in list(waiting):
            read_at, until = _db("poll", store.reading_state, alias, default=(None, None))
            if read_at is not None and read_at != records[alias].read_at:
                fresh = _db("load", store.load, alias)
                if fresh is not None and not _covers(fresh, commands):
                    # The claimer asked less (a table reading; we want ``active``
                    # too): its reading lacks fields, so read ourselves now.
                    waiting.remove(alias)
                    records[alias] = fresh
                    _db("claim", store.claim, alias, token, timeout + HARD_GRACE)
                    start(alias, max(0.05, hard_deadline - HARD_GRACE - time.monotonic()))
                    continue
                shared = fresh and store.status_from_record(fresh, masked_broker(alias))
                if shared is not None:
                    results[alias] = shared
                    waiting.remove(alias)
            elif (until is None or until < datetime.now(UTC)) and _db(
                    "claim", store.claim, alias, token, timeout + HARD_GRACE, default=True):
                # The claimer gave up or died: read ourselves. (Another waiter
                # that claimed first reads instead; we wait for its reading.)
                waiting.remove(alias)
                start(alias, max(0.05, hard_deadline - HARD_GRACE - time.monotonic()))

    for thread in threads.values():
        thread.join(max(0.0, hard_deadline - time.monotonic()))
    statuses: dict[str, AppStatus] = {}
    for alias in aliases:
        status = results.get(alias)
        if status is None and alias not in threads:
            # Waited for another process's reading, which did not arrive.
            statuses[alias] = _unreachable(
                alias, f"no answer: another process is reading this app and its reading "
                       f"did not arrive within {timeout + HARD_GRACE:.1f} s",
                records[alias], list(commands), duration=timeout + HARD_GRACE)
            continue
        if status is None:
            # Still running: a broker that accepted the connection and then
            # stalled (the daemon thread ends on its own socket timeouts).
            status = _unreachable(
                alias, f"no answer from the broker within {timeout + HARD_GRACE:.1f} s",
                records[alias], list(commands), duration=timeout + HARD_GRACE)
        if not status.shared:
            _remember(status, records[alias])
            if in_db[alias]:
                _db("save", store.save, status, records[alias], token)
        statuses[alias] = status
    return statuses


# -- the public record API ----------------------------------------------------------------

def last_reading(alias: str) -> AppStatus | None:
    """The latest stored reading of ``alias`` (any age), without broadcasting; None if none.

    For readers that must never send a broadcast (``/metrics``): two queries.
    ``read_at`` says how old it is; silent workers carry their last values
    and ``last_seen`` (a reply or a heartbeat). With no reading yet but
    heartbeats recorded, the workers are listed silent (``commands == []``).
    """
    apps[alias]
    known, _ = _load(alias)
    status = store.status_from_record(known, masked_broker(alias))
    if status is None and known.workers:
        # Workers known from heartbeats only (mark_seen), never read: listed
        # silent with their last_seen; ``commands`` is empty and ``read_at``
        # is the latest heartbeat.
        latest = max(seen.last_seen for seen in known.workers.values())
        status = AppStatus(alias=alias, broker=masked_broker(alias), reachable=True,
                           error=None, read_at=latest, shared=True,
                           workers=sorted(store.silent_workers(known, latest, True, []),
                                          key=lambda worker: worker.name))
    return status


def mark_seen(alias: str, hostname: str, when: datetime | float | None = None) -> None:
    """Record a sign of life of a worker (a heartbeat event) at ``when`` (default: now).

    A worker seen this way counts as seen for its status ("no reply" rather
    than "offline") and for the health window; it never moves ``last_seen``
    back. Raises ``DatabaseError`` on a database problem (the caller batches
    and retries); for many workers at once use :func:`mark_seen_many`.
    """
    mark_seen_many(alias, {hostname: when})


def mark_seen_many(alias: str, seen: Mapping[str, datetime | float | None]) -> None:
    """:func:`mark_seen` for several workers of one app (hostname -> when)."""
    moment = datetime.now(UTC)
    store.mark_seen_many(alias, {
        hostname: (moment if when is None else datetime.fromtimestamp(when, UTC)
                   if isinstance(when, int | float) else when)
        for hostname, when in seen.items()})


def forget_workers(aliases: Iterable[str] | None = None) -> None:
    """Drop the record of ``aliases`` (all configured apps by default), memory and database."""
    aliases = list(aliases if aliases is not None else apps)
    with _memory_lock:
        for alias in aliases:
            _memory.pop(alias, None)
    _db("forget", store.forget, aliases)


def load_seen(alias: str) -> dict[str, float]:
    """worker name -> last sign of life (epoch seconds), from the record (compatibility)."""
    known, _ = _load(alias)
    return {name: seen.last_seen.timestamp() for name, seen in known.workers.items()}


def save_seen(alias: str, seen: Mapping[str, float]) -> None:
    """Mark workers seen at the given epoch times (compatibility; see :func:`mark_seen_many`)."""
    mark_seen_many(alias, dict(seen))
