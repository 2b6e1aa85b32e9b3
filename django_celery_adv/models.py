"""Tables of the library: the database lock backend's leases and fencing counters."""

from __future__ import annotations

from django.db import models


class LockFence(models.Model):
    """Last fencing token granted per lock name (database backend).

    Bumping this row in the acquire transaction also serializes acquirers of
    one name, which is what keeps the holder count within capacity.
    """

    name = models.CharField(max_length=200, primary_key=True)
    last_token = models.BigIntegerField(default=0)

    class Meta:
        verbose_name = "lock fencing counter"

    def __str__(self) -> str:
        return f"{self.name}: {self.last_token}"


class LockLease(models.Model):
    """One held slot of a lock (database backend); the row is the lease."""

    name = models.CharField(max_length=200, db_index=True)
    slot = models.PositiveIntegerField()
    token = models.BigIntegerField()
    task_id = models.CharField(max_length=255, blank=True, null=True)
    hostname = models.CharField(max_length=255, blank=True)
    pid = models.PositiveIntegerField(default=0)
    acquired_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        verbose_name = "lock lease"
        constraints = [
            models.UniqueConstraint(fields=["name", "slot"], name="dca_lease_unique_slot"),
        ]

    def __str__(self) -> str:
        return f"{self.name}[{self.slot}] #{self.token}"
