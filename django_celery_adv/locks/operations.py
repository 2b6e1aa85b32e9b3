"""What operators do to locks, from the admin, a command or a shell: list the
holders of a lock, and force-release them.

Both go through the lock's ``LockDefinition`` row (its backend), so the admin
pages and commands never talk to a lock server themselves.

Guarantees:

* :func:`holders` and :func:`force_release` raise
  :class:`~django_celery_adv.exceptions.LockError` when the lock server fails
  (the message names the backend, never a secret); nothing else escapes for a
  server fault;
* :func:`force_release` frees only slots that are live at that moment, reports
  exactly the tokens it freed, and writes one admin-log entry per call when a
  user is given and something was freed. The evicted holder learns it at its
  next renewal (its lease is reported lost), which a TTL bounds.
"""

from __future__ import annotations

from typing import Any

from .. import conf
from .backends import lock_backends
from .backends.base import Lease


def backend_alias(name: str) -> str:
    """The lock backend alias of lock ``name`` (its row's, else the default)."""
    from ..models import LockDefinition

    alias = LockDefinition.objects.filter(name=name).values_list("backend", flat=True).first()
    return alias or conf.DEFAULT_LOCK_BACKEND_ALIAS


def holders(name: str, *, backend: str | None = None) -> list[Lease]:
    """The live leases of lock ``name`` in slot order (``LockError`` if its server fails)."""
    return lock_backends[backend or backend_alias(name)].holders(name)


def force_release(name: str, token: int | None = None, *, user: Any = None,
                  backend: str | None = None) -> list[int]:
    """Free the slot granted with ``token`` (every live slot if None), whoever holds it.

    Returns the tokens actually freed (empty if ``token`` was no longer held).
    With ``user`` (a Django user), one admin-log entry on the lock's row
    records the freed tokens.
    """
    from ..models import LockDefinition

    alias = backend or backend_alias(name)
    lock_backend = lock_backends[alias]
    tokens = [token] if token is not None else [lease.token for lease in lock_backend.holders(name)]
    released = [t for t in tokens if lock_backend.force_release(name, t)]
    if user is not None and released:
        from django.contrib.admin.models import CHANGE, LogEntry

        rows = LockDefinition.objects.filter(name=name)
        if rows.exists():
            LogEntry.objects.log_actions(user.pk, rows, CHANGE,
                                         change_message=f"Force-released token(s) {released}")
    return released
