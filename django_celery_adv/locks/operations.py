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

import logging
from dataclasses import dataclass, field
from typing import Any

from django.utils.translation import gettext as _

from .. import conf
from ..exceptions import CeleryAdvError
from ..masking import is_secret_key, mask_text, url_secrets
from .backends import lock_backends
from .backends.base import Lease

logger = logging.getLogger(__name__)


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


def backend_secrets(alias: str) -> list[str]:
    """Secrets in a lock backend's OPTIONS: URL passwords and secret-named values."""
    options = (conf.lock_backend_settings().get(alias) or {}).get("OPTIONS") or {}
    found: list[str] = []
    if isinstance(options, dict):
        for key, value in options.items():
            if isinstance(value, str):
                found.extend(url_secrets(value) if "://" in value else [])
                if is_secret_key(key):
                    found.append(value)
    return found


def masked_error(alias: str, error: BaseException) -> str:
    """An error of backend ``alias`` as operators may read it: no secret in it."""
    text = str(error) if isinstance(error, CeleryAdvError) else f"{type(error).__name__}: {error}"
    return mask_text(text, backend_secrets(alias))


def describe_backend(alias: str) -> str:
    """``alias: where it points`` for pages and commands, masked; never raises."""
    try:
        return mask_text(f"{alias}: {lock_backends[alias].describe()}", backend_secrets(alias))
    except CeleryAdvError:
        return _("%(alias)s: not configured") % {"alias": alias}
    except Exception as e:  # a backend that cannot even be built: say so, in place
        return f"{alias}: {masked_error(alias, e)}"


@dataclass
class HolderReading:
    """The holders of one lock as read now, or why they could not be."""

    leases: list[Lease] = field(default_factory=list)
    error: str | None = None


class HolderReader:
    """Reads the holders of many locks for one page or command run.

    A backend that failed once is not asked again by this reader: a server
    that is down would otherwise make every further lock on it wait for its
    own connection timeout.
    """

    def __init__(self) -> None:
        self._failed: dict[str, str] = {}

    def read(self, name: str, backend: str) -> HolderReading:
        if backend in self._failed:
            return HolderReading(error=self._failed[backend])
        try:
            return HolderReading(holders(name, backend=backend))
        except CeleryAdvError as e:
            error = masked_error(backend, e)
        except Exception as e:  # a backend bug must not take a page down: say it, log it
            logger.exception("Reading the holders of lock %r failed", name)
            error = masked_error(backend, e)
        self._failed[backend] = error
        return HolderReading(error=error)
