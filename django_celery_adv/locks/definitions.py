"""Lock policies read from ``LockDefinition`` rows, cached per process.

The row wins over the code: ``@locked("x", 10)`` only supplies the defaults of
a row created on first use. A one-row change tracker (``LockDefinitionChange``,
the pattern of django-celery-beat's ``PeriodicTasks``) is bumped by the
``post_save`` / ``post_delete`` signals of ``LockDefinition``; each process
reads that one row at most every ``CHECK_SECONDS`` and re-reads the
definitions only when it moved.

Guarantees: an edit saved through the ORM (the admin, ``save()``,
``delete()``) reaches every running process within ``CHECK_SECONDS`` (and the
saving process at once), with no query per task. ``QuerySet.update()`` sends
no signal: call :func:`mark_changed` after one. With the database down, the
last known policies keep being served.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from django.db import DatabaseError, IntegrityError

from ..process import ForkSafeLock

#: How often a process asks the change tracker whether a definition moved.
CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class LockPolicy:
    name: str
    backend: str
    capacity: int
    ttl: float
    retry_countdown: float
    retry_jitter: float
    retry_backoff: bool
    wait: float
    max_retries: int | None
    on_busy: str
    #: At beat, a periodic task of this lock due while it is full: "skip" or "send";
    #: "" leaves it to the app's ``BEAT["ON_BUSY"]``.
    beat_on_busy: str = ""

    @property
    def paused(self) -> bool:
        return self.capacity <= 0

    def busy_reason(self) -> str:
        """Why a grant was refused, for log lines and errors."""
        if self.paused:
            return f"lock {self.name!r} is paused (capacity 0)"
        return f"lock {self.name!r} busy (all {self.capacity} slot(s) held)"


class PolicyCache:
    def __init__(self) -> None:
        self._policies: dict[str, LockPolicy] = {}
        self._version: int | None = None
        self._checked_at = float("-inf")
        self._lock = ForkSafeLock()

    def get(self, name: str, capacity: int, **code_defaults: object) -> LockPolicy:
        """The policy of ``name``; creates its row from the code's defaults if absent."""
        self._check()
        policy = self._policies.get(name)
        if policy is None:
            policy = self._create(name, capacity, code_defaults)
        return policy

    def current(self, policy: LockPolicy) -> LockPolicy:
        """``policy`` as the admin has it now (a waiting task follows edits)."""
        self._check()
        return self._policies.get(policy.name, policy)

    def _check(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < CHECK_SECONDS:
            return
        self._checked_at = now
        from ..models import LockDefinitionChange

        try:
            version = LockDefinitionChange.current_version()
        except DatabaseError:
            return  # keep serving the last known policies; try again later
        if version != self._version:
            self.reload(version)

    def reload(self, version: int | None = None) -> None:
        from ..models import LockDefinition

        try:
            rows = list(LockDefinition.objects.all())
        except DatabaseError:
            self._version = None  # read again at the next check
            return
        with self._lock:
            self._policies = {row.name: _policy(row) for row in rows}
            self._version = version

    def invalidate(self) -> None:
        """Re-read at the next use (this process saved or deleted a definition)."""
        self._version = None
        self._checked_at = float("-inf")

    def _create(self, name: str, capacity: int, code_defaults: dict) -> LockPolicy:
        from ..models import LockDefinition

        # The rest comes from the model's field defaults, which read LOCK_DEFAULTS.
        fields = {"capacity": capacity,
                  **{key: value for key, value in code_defaults.items() if value is not None}}
        try:
            row, _ = LockDefinition.objects.get_or_create(name=name, defaults=fields)
        except IntegrityError:
            row = LockDefinition.objects.get(name=name)
        except DatabaseError:
            # No database: run on the code's defaults rather than not at all.
            row = LockDefinition(name=name, **fields)
        policy = _policy(row)
        with self._lock:
            self._policies[name] = policy
        return policy


def _policy(row) -> LockPolicy:
    return LockPolicy(
        name=row.name, backend=row.backend, capacity=row.capacity, ttl=row.ttl,
        retry_countdown=row.retry_countdown, retry_jitter=row.retry_jitter,
        retry_backoff=row.retry_backoff, wait=row.wait, max_retries=row.max_retries,
        on_busy=row.on_busy, beat_on_busy=row.beat_on_busy,
    )


policies = PolicyCache()


def mark_changed(**kwargs: object) -> None:
    """Tell every process that a ``LockDefinition`` changed (signal receiver)."""
    from ..models import LockDefinitionChange

    LockDefinitionChange.bump()
    policies.invalidate()


def connect_signals() -> None:
    """Wire the change tracker to the model's signals (from ``AppConfig.ready``)."""
    from django.db.models.signals import post_delete, post_save

    from ..models import LockDefinition

    for signal in (post_save, post_delete):
        signal.connect(mark_changed, sender=LockDefinition,
                       dispatch_uid=f"django_celery_adv.lock_definition_changed.{signal}")
