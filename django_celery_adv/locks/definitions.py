"""Lock policies read from ``LockDefinition`` rows, cached per process.

The row wins over the code: ``@locked("x", 10)`` only supplies the defaults of
a row created on first use. Rows are re-read at most every
``REFRESH_SECONDS`` per process (one query for all locks), so an admin edit
reaches running workers within that time without a query per task.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from django.db import DatabaseError, IntegrityError

from .. import conf

REFRESH_SECONDS = 2.0


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


class PolicyCache:
    def __init__(self) -> None:
        self._policies: dict[str, LockPolicy] = {}
        self._loaded_at = float("-inf")
        self._lock = threading.Lock()

    def get(self, name: str, capacity: int, **code_defaults: object) -> LockPolicy:
        """The policy of ``name``; creates its row from the code's defaults if absent."""
        if time.monotonic() - self._loaded_at > REFRESH_SECONDS:
            self.reload()
        policy = self._policies.get(name)
        if policy is None:
            policy = self._create(name, capacity, code_defaults)
        return policy

    def reload(self) -> None:
        from ..models import LockDefinition

        try:
            rows = list(LockDefinition.objects.all())
        except DatabaseError:
            # Keep serving the last known policies; the next call tries again.
            self._loaded_at = time.monotonic() - REFRESH_SECONDS / 2
            return
        with self._lock:
            self._policies = {row.name: _policy(row) for row in rows}
            self._loaded_at = time.monotonic()

    def invalidate(self) -> None:
        self._loaded_at = float("-inf")

    def _create(self, name: str, capacity: int, code_defaults: dict) -> LockPolicy:
        from ..models import LockDefinition

        defaults = conf.get("LOCK_DEFAULTS")
        fields = {
            "capacity": capacity,
            "ttl": defaults["TTL"],
            "retry_countdown": defaults["RETRY_COUNTDOWN"],
            "retry_jitter": defaults["RETRY_JITTER"],
            "retry_backoff": defaults["RETRY_BACKOFF"],
            "wait": defaults["WAIT"],
            "max_retries": defaults["MAX_RETRIES"],
            **{key: value for key, value in code_defaults.items() if value is not None},
        }
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
        on_busy=row.on_busy,
    )


policies = PolicyCache()
