"""Lock backend on the Django database: the embedded default (SQLite, PostgreSQL).

Acquire is one transaction: bump the name's fencing row (this row lock
serializes acquirers of one name), delete that name's expired leases, then
insert a lease into the lowest free slot. The database enforces the
uniqueness of (name, slot), so even a broken serialization cannot hand one
slot out twice.

Time is the application servers' clock: hosts that share a lock must keep
their clocks in sync (NTP) to within a small part of the TTL.

Error handling: ``DatabaseError`` becomes ``LockError``. On SQLite, give the
database ``"OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20}`` so that
concurrent acquirers wait for each other instead of failing with "database is
locked", and ``"init_command": "PRAGMA journal_mode=WAL;"`` so that the
read-only "is it full?" checks of waiting acquirers never hold up a releasing
writer.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from django.db import DatabaseError, IntegrityError, router, transaction
from django.db.models import F

from ...exceptions import LockError
from ...models import LockFence, LockLease
from .base import Holder, Lease, LockBackend, utcnow


class DatabaseBackend(LockBackend):
    """Leases are rows of ``LockLease``; tokens come from ``LockFence``.

    OPTIONS: ``using`` (database alias, default: the router's choice).
    """

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        self.using = options.get("using") or router.db_for_write(LockLease)

    def acquire(self, name: str, capacity: int, holder: Holder, ttl: float) -> Lease | None:
        if capacity <= 0:
            return None
        try:
            # A plain read first: a full lock is answered without taking the
            # write lock that the holders need to release (SQLite locks the file).
            live = LockLease.objects.using(self.using).filter(name=name, expires_at__gt=utcnow())
            if live.count() >= capacity:
                return None
            with transaction.atomic(using=self.using):
                token = self._next_token(name)
                now = utcnow()
                leases = LockLease.objects.using(self.using)
                leases.filter(name=name, expires_at__lte=now).delete()
                taken = set(leases.filter(name=name).values_list("slot", flat=True))
                if len(taken) >= capacity:
                    transaction.set_rollback(True, using=self.using)
                    return None
                slot = min(set(range(capacity)) - taken)
                row = leases.create(
                    name=name, slot=slot, token=token, task_id=holder.task_id or "",
                    hostname=holder.hostname, pid=holder.pid,
                    acquired_at=now, expires_at=now + timedelta(seconds=ttl),
                )
                lease = self._lease(row, ttl)
        except IntegrityError:
            return None  # another acquirer took the slot first: busy, not broken
        except DatabaseError as e:
            raise LockError(f"database lock backend {self.alias!r}: {e}") from e
        return lease

    def _next_token(self, name: str) -> int:
        fences = LockFence.objects.using(self.using).select_for_update()
        updated = fences.filter(name=name).update(last_token=F("last_token") + 1)
        if not updated:
            try:
                with transaction.atomic(using=self.using):
                    LockFence.objects.using(self.using).create(name=name, last_token=1)
                return 1
            except IntegrityError:
                fences.filter(name=name).update(last_token=F("last_token") + 1)
        return fences.get(name=name).last_token

    def release(self, lease: Lease) -> None:
        self._run(lambda: LockLease.objects.using(self.using).filter(
            name=lease.name, slot=lease.slot, token=lease.token).delete())

    def renew(self, lease: Lease) -> bool:
        now = utcnow()
        expires_at = now + timedelta(seconds=lease.ttl)
        updated = self._run(lambda: LockLease.objects.using(self.using).filter(
            name=lease.name, slot=lease.slot, token=lease.token, expires_at__gt=now,
        ).update(expires_at=expires_at))
        if updated:
            lease.expires_at = expires_at
        return bool(updated)

    def holders(self, name: str) -> list[Lease]:
        rows = self._run(lambda: list(LockLease.objects.using(self.using).filter(
            name=name, expires_at__gt=utcnow()).order_by("slot")))
        return [self._lease(row) for row in rows]

    def force_release(self, name: str, token: int) -> bool:
        deleted, _ = self._run(lambda: LockLease.objects.using(self.using).filter(
            name=name, token=token).delete())
        return bool(deleted)

    def describe(self) -> str:
        return f"database {self.using!r}"

    def _run(self, operation: Any) -> Any:
        try:
            return operation()
        except DatabaseError as e:
            raise LockError(f"database lock backend {self.alias!r}: {e}") from e

    def _lease(self, row: LockLease, ttl: float | None = None) -> Lease:
        if ttl is None:
            ttl = (row.expires_at - row.acquired_at).total_seconds()
        return Lease(
            name=row.name, slot=row.slot, token=row.token,
            holder=Holder(task_id=row.task_id or None, hostname=row.hostname, pid=row.pid),
            acquired_at=row.acquired_at, expires_at=row.expires_at, ttl=ttl,
            backend=self.alias,
        )
