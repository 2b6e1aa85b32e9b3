"""``LockedScheduler``: django-celery-beat's ``DatabaseScheduler`` that is safe to
run on every host: one leader per app sends, the others stand by.

Run it with ``celery beat -S django_celery_adv`` (the ``celery.beat_schedulers``
entry point) or ``manage.py celery <alias> beat -S django_celery_adv``.

Per tick (at most every TTL/4, whatever ``beat_max_loop_interval`` says) the
beat refreshes its leadership (:mod:`.leadership`). A standby evaluates no
entry and sends nothing; a beat that becomes leader (again) first re-reads the
whole schedule from the database. For each due entry the leader:

1. checks its fence (lease valid, with a margin, by its own monotonic clock);
2. writes the run ahead: ``last_run_at`` / ``total_run_count`` with a
   compare-and-set on the ``last_run_at`` it read, so the row is the truth
   before the message leaves, and a run another leader already recorded is
   never sent twice (the schedule is re-read instead);
3. skips the run if it is later than the entry's misfire grace, or if the
   task's lock is full and its lock definition's ``beat_on_busy`` (if set,
   else the app's ``ON_BUSY``) is "skip" (logged at INFO with the holders;
   the run counts as done, so nothing piles up);
4. checks the fence again and sends, through this app's broker, with the
   lease's fencing token (``x-beat-token``) and the alias (``x-beat-app``)
   as message headers.

Runs missed while no beat led are coalesced: an entry is due once however
many periods passed (``last_run_at`` becomes the send time). A run is sent at
most once: a send the broker refuses is logged and not retried (as in Celery).

Per-app schedules: the beat of alias X loads only the periodic tasks whose
task belongs to X: a task defined with ``apps[X].task`` (or registered on X),
else the ``TASK_APPS`` glob that matches its name, else the app chosen for the
periodic task in the admin, else ``default`` (:func:`task_owner`): the routing a
send from code follows, and the send runs inside ``using(X)``.

Error handling: a database error while reading the schedule or writing a run
ahead skips that tick or send and re-reads the schedule at the next tick;
lock-server errors are handled in :mod:`.leadership`; a lock server that cannot
say whether a task's lock is full lets the run go (the worker's lock decides
then). Nothing here stops the beat.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from django.db import DatabaseError, InterfaceError
from django.db.models import F
from django_celery_beat.schedulers import DatabaseScheduler, ModelEntry

from .. import conf
from ..exceptions import LockError
from ..locks.api import describe_holder
from ..locks.definitions import policies
from ..locks.operations import holders
from ..locks.tasks import LockedTask
from ..registry import apps, task_alias, using
from .config import BeatSettings, beat_settings
from .health import HealthRecorder
from .leadership import Leadership

logger = logging.getLogger("django_celery_adv.beat")

TOKEN_HEADER = "x-beat-token"
APP_HEADER = "x-beat-app"


def task_owner(task_name: str, chosen: str | None = None) -> str:
    """The alias whose beat sends a periodic task of ``task_name``: the app the task
    is bound to, else its ``TASK_APPS`` match, else the app ``chosen`` in the periodic
    task admin (``PeriodicTaskApp``), else ``default``: where a send from code inside
    ``using(chosen)`` would go."""
    for alias in apps:
        task = apps[alias].tasks.get(task_name)
        if task is not None and getattr(task, "adv_alias", None) == alias:
            return alias
    if chosen not in apps:
        chosen = None
    return task_alias(task_name) or chosen or conf.DEFAULT_APP_ALIAS


def chosen_apps() -> dict[str, str]:
    """periodic task name -> the app chosen for it in the admin."""
    from ..models import PeriodicTaskApp

    return dict(PeriodicTaskApp.objects.values_list("periodic_task", "app_alias"))


def task_lock(task: Any) -> tuple[str, int] | None:
    """(lock name, capacity) of a ``LockedTask`` or an ``@locked`` task, else None."""
    if isinstance(task, LockedTask):
        return task.lock_name or task.name, task.lock_capacity
    run = getattr(task, "run", None)
    name = getattr(run, "lock_name", None)
    return (name, getattr(run, "lock_capacity", 1)) if name else None


class LockedEntry(ModelEntry):
    """A ``ModelEntry`` that remembers the ``last_run_at`` it read from the row
    (the compare of the write-ahead) and keeps its app across runs."""

    def __init__(self, model: Any, app: Celery | None = None) -> None:
        self.stored_last_run_at = model.last_run_at
        super().__init__(model, app=app)

    def __next__(self) -> LockedEntry:
        self.model.last_run_at = self._default_now()
        self.model.total_run_count += 1
        self.model.no_changes = True
        return self.__class__(self.model, app=self.app)


class LockedScheduler(DatabaseScheduler):
    """A ``DatabaseScheduler`` whose beats elect one leader per app (see module doc)."""

    Entry = LockedEntry

    def __init__(self, app: Celery, *args: Any, **kwargs: Any) -> None:
        # Set before the base __init__, which reads the schedule through all_as_schedule().
        self.alias = getattr(app, "alias", conf.DEFAULT_APP_ALIAS)
        self.settings: BeatSettings = beat_settings(self.alias)
        self.leadership = Leadership(self.settings)
        self.sent = 0
        self._wake_at: float | None = None
        super().__init__(app, *args, **kwargs)
        self.max_interval = min(self.max_interval, self.settings.max_interval)
        self.health = HealthRecorder(self.alias, self.settings.lock_backend, self.max_interval)

    # -- the schedule of this app only -------------------------------------------

    def all_as_schedule(self) -> dict[str, LockedEntry]:
        chosen = chosen_apps()
        return {name: entry for name, entry in super().all_as_schedule().items()
                if task_owner(entry.task, chosen.get(name)) == self.alias}

    def reserve(self, entry: LockedEntry) -> LockedEntry:
        # In memory only: apply_entry writes the run ahead of the send, so
        # there is nothing for sync() to write later (and nothing stale for a
        # deposed leader to write over its successor's runs). The schedule
        # keeps the new entry: a heap rebuilt from it must not find the old one.
        new_entry = self._schedule[entry.name] = next(entry)
        return new_entry

    def _forget_schedule(self) -> None:
        """Re-read every entry from the database at the next tick."""
        self._heap = None
        self._initial_read = True

    # -- ticking -----------------------------------------------------------------

    def tick(self, *args: Any, **kwargs: Any) -> float:
        started = time.monotonic()
        lag = started - self._wake_at if self._wake_at is not None else 0.0
        before = (self.leadership.leading, self.leadership.token)
        self.leadership.refresh()
        if (self.leadership.leading, self.leadership.token) != before:
            self._forget_schedule()  # a new term starts from the database's truth
        interval = self.max_interval
        if self.leadership.leading:
            try:
                interval = super().tick(*args, **kwargs)
            except (DatabaseError, InterfaceError) as e:  # the schedule could not be read
                logger.warning("beat %s: could not read the schedule: %s; trying again",
                               self.alias, e)
                self._forget_schedule()
        self._wake_at = time.monotonic() + (interval or 0)
        self._record_health(lag)
        return interval

    def _record_health(self, lag: float) -> None:
        leading = self.leadership.leading
        next_due = None
        if leading and self._heap:
            when, _, entry = self._heap[0]
            next_due = (entry.name, datetime.fromtimestamp(when, UTC))
        self.health.record(role="leader" if leading else "standby",
                           token=self.leadership.token if leading else None,
                           since=self.leadership.since, lag=lag, next_due=next_due,
                           sent=self.sent)

    # -- sending -----------------------------------------------------------------

    def apply_entry(self, entry: LockedEntry, producer: Any = None) -> None:
        if not self.leadership.may_send():
            self._refused(entry, "its leadership lease is not valid")
            return
        if not self._write_ahead(entry):
            return
        skip = self._skip_reason(entry)
        if skip:
            logger.info("beat %s: skipped %s (%s): %s", self.alias, entry.name, entry.task, skip)
            return
        if not self.leadership.may_send():  # the write may have outlasted the lease
            self._refused(entry, "its leadership lease ran out while recording the run")
            return
        headers = {**(entry.options.get("headers") or {}),
                   TOKEN_HEADER: self.leadership.token, APP_HEADER: self.alias}
        entry.options = {**entry.options, "headers": headers}
        with using(self.alias):
            super().apply_entry(entry, producer=producer)
        self.sent += 1

    def _refused(self, entry: LockedEntry, why: str) -> None:
        logger.warning("beat %s: not sending %s: %s", self.alias, entry.name, why)
        self._forget_schedule()

    def _write_ahead(self, entry: LockedEntry) -> bool:
        """Record the run on the row, if the row still has the last run we read."""
        model = entry.model
        rows = self.Model.objects.filter(pk=model.pk)
        rows = rows.filter(last_run_at=entry.stored_last_run_at) \
            if entry.stored_last_run_at is not None else rows.filter(last_run_at__isnull=True)
        try:
            written = rows.update(last_run_at=model.last_run_at,
                                  total_run_count=F("total_run_count") + 1)
        except DatabaseError as e:
            logger.warning("beat %s: not sending %s: could not record the run: %s",
                           self.alias, entry.name, e)
            self._forget_schedule()
            return False
        if not written:
            logger.warning("beat %s: not sending %s: its last run changed in the database "
                           "(another leader ran it, or it was edited); re-reading",
                           self.alias, entry.name)
            self._forget_schedule()
        return bool(written)

    def _skip_reason(self, entry: LockedEntry) -> str | None:
        grace = self.settings.grace_for(entry.name)
        if grace is not None:
            try:
                late = -entry.schedule.remaining_estimate(entry.last_run_at).total_seconds()
            except Exception:  # a schedule kind without an estimate: never late
                late = 0.0
            if late > grace:
                return f"{late:.0f} s late, past its misfire grace of {grace} s"
        return self._lock_busy(entry)

    def _lock_busy(self, entry: LockedEntry) -> str | None:
        lock = task_lock(self.app.tasks.get(entry.task))
        if lock is None:
            return None
        try:
            policy = policies.get(*lock)
            # A lock definition's own choice (when it has one) wins over the app's.
            if (policy.beat_on_busy or self.settings.on_busy) == "send":
                return None
            if policy.paused:
                return policy.busy_reason()
            held = holders(policy.name, backend=policy.backend)
        except (LockError, DatabaseError) as e:
            logger.warning("beat %s: cannot tell whether lock %r of %s is free (%s); sending",
                           self.alias, lock[0], entry.name, e)
            return None
        if len(held) < policy.capacity:
            return None
        return (f"{policy.busy_reason()}; held by "
                f"{', '.join(describe_holder(lease.holder) for lease in held)}")

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.leadership.release()
            self.health.remove()

    @property
    def info(self) -> str:
        return (f"    . leadership -> lease {self.settings.lock_name!r} on lock backend "
                f"{self.settings.lock_backend!r}, TTL {self.settings.ttl:g} s")
