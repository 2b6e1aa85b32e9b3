"""Task-failure analytics: every failed task counted in a group per bug.

Celery's ``task_failure`` signal (sent for an exception in the task, a retry
that exhausts ``max_retries``, a hard time limit, a lost worker) is recorded in
:class:`~django_celery_adv.models.TaskFailure`, grouped by a fingerprint:

    task name + exception class + innermost frame of project code (file:function)

so the same bug met with different arguments is one group, whatever the line
numbers of a later release. "Project code" is every frame outside the standard
library, site-packages / dist-packages and this library; paths are made relative
to their ``sys.path`` entry so they are the same on every machine.

Per occurrence the group's counter and the day's counter
(:class:`~django_celery_adv.models.TaskFailureDay`) go up by one, and the
group keeps the newest message, traceback, task id, worker and arguments. A
resolved group reopens. Arguments, message and traceback are shortened, and
secret-looking values in them masked (:mod:`django_celery_adv.masking`), before
they are stored.

Error handling: recording never breaks the task or the worker. Any error while
recording (the database is down, a table is missing...) is logged on the
``django_celery_adv.failures`` logger and the occurrence is dropped.
``CELERY_ADV["RECORD_FAILURES"] = False`` turns recording off; it is read at
each failure, so ``override_settings`` works.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import reprlib
import socket
import sys
import sysconfig
import traceback as traceback_module
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from celery import signals
from django.db import DatabaseError, IntegrityError, router, transaction
from django.db.models import F, Q
from django.utils import timezone

from . import conf
from .dbretry import run_again_if_aborted
from .masking import mask_secrets, mask_text

if TYPE_CHECKING:
    from .models import TaskFailure

logger = logging.getLogger(__name__)

MAX_ARGS_CHARS = 2000
MAX_MESSAGE_CHARS = 4000
MAX_TRACEBACK_CHARS = 20000
_DISPATCH_UID = "django_celery_adv.failures.record"


# -- shortening ----------------------------------------------------------------------

_repr = reprlib.Repr()
_repr.maxstring = 200
_repr.maxother = 200
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 20
_repr.maxlevel = 4


def shorten(value: Any, limit: int = MAX_ARGS_CHARS) -> str:
    """A masked, bounded ``repr`` of task arguments for display."""
    try:
        # mask_text too: what an object's repr shows; cut before masking (linear, bounded)
        return mask_text(_repr.repr(mask_secrets(value)), limit=limit)
    except Exception as e:  # a broken __repr__ of an argument must not stop recording
        return f"<unrepresentable {type(value).__name__}: {type(e).__name__}>"


def _keep_end(text: str, limit: int) -> str:
    """The last ``limit`` characters (a traceback's end is what matters); the
    whole text is masked first: a cut at the front could split a secret."""
    if len(text) <= limit:
        return text
    return "...(truncated)\n" + text[-(limit - 15):]


# -- fingerprint -------------------------------------------------------------------

def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")
             if paths.get(name)}
    roots.add(os.path.dirname(os.path.abspath(__file__)))  # this library is not the project
    return tuple(os.path.join(os.path.realpath(root), "") for root in roots)


_LIBRARY_ROOTS = _library_roots()


def is_project_file(filename: str) -> bool:
    """Whether a frame's file is project code (not stdlib, site-packages or this library)."""
    if not filename or filename.startswith("<"):
        return False
    path = os.path.realpath(filename)
    parts = path.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    return not path.startswith(_LIBRARY_ROOTS)


def relative_path(filename: str) -> str:
    """``filename`` relative to the ``sys.path`` entry it was imported from, if any."""
    path = os.path.realpath(filename)
    best = ""
    for entry in sys.path:
        root = os.path.join(os.path.realpath(entry or os.curdir), "")
        if path.startswith(root) and len(root) > len(best):
            best = root
    return path[len(best):] if best else path


def innermost_project_frame(tb: TracebackType | None) -> str:
    """``file:function`` of the innermost project frame of ``tb`` (else of the innermost)."""
    frames = [frame for frame, _ in traceback_module.walk_tb(tb)]
    if not frames:
        return ""
    project = [frame for frame in frames if is_project_file(frame.f_code.co_filename)]
    frame = (project or frames)[-1]
    return f"{relative_path(frame.f_code.co_filename)}:{frame.f_code.co_name}"


def exception_type_name(exception: BaseException) -> str:
    """``module.Class`` of the exception (of the original one Celery wrapped)."""
    from celery.utils.serialization import UnpickleableExceptionWrapper

    if isinstance(exception, UnpickleableExceptionWrapper):
        return f"{exception.exc_module}.{exception.exc_cls_name}"
    cls = type(exception)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def fingerprint(task_name: str, exception_type: str, location: str) -> str:
    """The group key: a hex digest of task name, exception class and location."""
    key = "\n".join((task_name, exception_type, location))
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


# -- one occurrence ----------------------------------------------------------------

@dataclass
class Occurrence:
    """One failure as it will be stored: already shortened and masked."""

    task_name: str
    exception_type: str
    location: str
    message: str = ""
    traceback: str = ""
    task_id: str = ""
    args: str = ""
    kwargs: str = ""
    app_alias: str = ""
    hostname: str = ""
    when: datetime.datetime = field(default_factory=timezone.now)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.task_name, self.exception_type, self.location)

    @classmethod
    def from_exception(cls, *, task_name: str, exception: BaseException,
                       tb: TracebackType | None = None, traceback_text: str | None = None,
                       task_id: str | None = None, args: Iterable[Any] | None = None,
                       kwargs: Mapping[str, Any] | None = None, app_alias: str = "",
                       hostname: str = "") -> Occurrence:
        """Build an occurrence from an exception and what Celery knows of the task."""
        tb = tb if tb is not None else exception.__traceback__
        if traceback_text is None:
            traceback_text = "".join(traceback_module.format_exception(
                type(exception), exception, tb))
        message = getattr(exception, "exc_msg", None) or str(exception)
        return cls(
            task_name=task_name[:255],
            exception_type=exception_type_name(exception)[:255],
            location=innermost_project_frame(tb)[:500],
            message=mask_text(message, limit=MAX_MESSAGE_CHARS),
            traceback=_keep_end(mask_text(traceback_text), MAX_TRACEBACK_CHARS),
            task_id=(task_id or "")[:255],
            args=shorten(tuple(args or ())),
            kwargs=shorten(dict(kwargs or {})),
            app_alias=(app_alias or "")[:100],
            hostname=(hostname or socket.gethostname())[:255],
        )


# -- recording ---------------------------------------------------------------------

def record(occurrence: Occurrence, *, using: str | None = None) -> TaskFailure:
    """Count ``occurrence`` in its group and day, creating them as needed.

    Safe under concurrency: counters go up with ``F()`` updates, a create
    that loses a race (``IntegrityError``) turns into the update, and a
    transaction the database aborts to break a deadlock (InnoDB's gap locks at
    REPEATABLE READ) runs again. Errors propagate; :func:`on_task_failure` is
    what swallows them.
    """
    from .models import TaskFailure

    db = using or router.db_for_write(TaskFailure)
    now = occurrence.when
    latest = {
        "last_seen": now, "last_message": occurrence.message,
        "last_traceback": occurrence.traceback, "last_task_id": occurrence.task_id,
        "last_args": occurrence.args, "last_kwargs": occurrence.kwargs,
        "last_hostname": occurrence.hostname, "app_alias": occurrence.app_alias,
        "resolved": False, "resolved_at": None,
    }
    return run_again_if_aborted(lambda: _record(occurrence, db, latest))


def _record(occurrence: Occurrence, db: str, latest: dict[str, Any]) -> TaskFailure:
    from .models import TaskFailure, TaskFailureDay

    now = occurrence.when
    with transaction.atomic(using=db):
        groups = TaskFailure.objects.using(db).filter(fingerprint=occurrence.fingerprint)
        _increment_or_create(
            groups, db, {"count": F("count") + 1, **latest},
            lambda: TaskFailure(
                fingerprint=occurrence.fingerprint, task_name=occurrence.task_name,
                exception_type=occurrence.exception_type, location=occurrence.location,
                count=1, first_seen=now, **latest))
        group = groups.get()
        day = timezone.localdate(now)
        _increment_or_create(
            TaskFailureDay.objects.using(db).filter(failure=group, day=day), db,
            {"count": F("count") + 1},
            lambda: TaskFailureDay(failure=group, day=day, count=1))
    return group


def _increment_or_create(queryset: Any, db: str, update: dict[str, Any],
                         new: Callable[[], Any]) -> None:
    if queryset.update(**update):
        return
    try:
        with transaction.atomic(using=db):
            new().save(using=db, force_insert=True)
    except IntegrityError:  # created meanwhile by another process: count on it
        queryset.update(**update)


def on_task_failure(sender: Any = None, task_id: str | None = None,
                    exception: BaseException | None = None, args: Any = None,
                    kwargs: Any = None, traceback: Any = None, einfo: Any = None,
                    **extra: Any) -> None:
    """Celery's ``task_failure`` receiver: record the failure; never raise."""
    task_name = getattr(sender, "name", None) or str(sender)
    try:
        if not conf.get("RECORD_FAILURES") or exception is None:
            return
        tb = traceback if isinstance(traceback, TracebackType) else None
        if tb is None:
            tb = exception.__traceback__ or getattr(einfo, "tb", None)
        request = getattr(sender, "request", None)
        occurrence = Occurrence.from_exception(
            task_name=task_name, exception=exception, tb=tb,
            traceback_text=getattr(einfo, "traceback", None), task_id=task_id,
            args=args if isinstance(args, list | tuple) else (),
            kwargs=kwargs if isinstance(kwargs, Mapping) else {},
            app_alias=_alias_of(sender),
            hostname=getattr(request, "hostname", None) or "",
        )
        record(occurrence)
    except DatabaseError as e:
        logger.warning("could not record the failure of %s[%s] (%s: %s); dropped",
                       task_name, task_id, type(e).__name__, e)
    except Exception:
        logger.exception("could not record the failure of %s[%s]; dropped", task_name, task_id)


def _alias_of(task: Any) -> str:
    alias = getattr(getattr(task, "app", None), "alias", None)
    if alias:
        return alias
    from .cli import ALIAS_ENV

    return os.environ.get(ALIAS_ENV, "")


def connect() -> None:
    """Connect the ``task_failure`` receiver (no I/O). Called from ``AppConfig.ready()``."""
    signals.task_failure.connect(on_task_failure, weak=False, dispatch_uid=_DISPATCH_UID)


# -- reading and pruning -------------------------------------------------------------

def daily_counts(failure: TaskFailure, days: int = 30,
                 today: datetime.date | None = None) -> list[tuple[datetime.date, int]]:
    """``(day, count)`` for each of the last ``days`` days up to ``today``, zeros included."""
    today = today or timezone.localdate()
    start = today - datetime.timedelta(days=days - 1)
    counts = dict(failure.days.filter(day__gte=start, day__lte=today)
                  .values_list("day", "count"))
    return [(start + datetime.timedelta(days=i), counts.get(start + datetime.timedelta(days=i), 0))
            for i in range(days)]


@dataclass(frozen=True)
class PruneResult:
    groups: int
    days: int


def prune(days: int | None = None, *, now: datetime.datetime | None = None,
          dry_run: bool = False) -> PruneResult:
    """Delete per-day counts older than ``days`` and groups not seen for as long.

    ``days`` defaults to ``CELERY_ADV["FAILURE_RETENTION_DAYS"]``. A group
    still seen within the period keeps its lifetime ``count``.
    """
    from .models import TaskFailure, TaskFailureDay

    days = conf.get("FAILURE_RETENTION_DAYS") if days is None else days
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise ValueError(f"retention must be a number of days >= 1, not {days!r}")
    now = now or timezone.now()
    cutoff = now - datetime.timedelta(days=days)
    old_groups = TaskFailure.objects.filter(last_seen__lt=cutoff)
    old_days = TaskFailureDay.objects.filter(
        Q(day__lt=timezone.localdate(cutoff)) | Q(failure__in=old_groups))
    if dry_run:
        return PruneResult(groups=old_groups.count(), days=old_days.count())
    with transaction.atomic():
        days_deleted = old_days.delete()[0]  # first: the groups' cascade finds none left
        groups_deleted = old_groups.delete()[1].get(TaskFailure._meta.label, 0)
    return PruneResult(groups=groups_deleted, days=days_deleted)
