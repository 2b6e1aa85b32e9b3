"""The contract every lock backend keeps, and the lease it hands out.

A backend grants up to ``capacity`` concurrent leases on a lock name. Each
grant gets a fencing token that is strictly greater than every token granted
before it for that name, so a storage can reject a writer whose lease has been
superseded. Guarantees:

* never more holders than capacity (capacity 0 grants nothing: the lock is paused);
* a holder that dies frees its slot within its TTL (ZooKeeper: the session timeout);
* ``renew`` extends only a lease that is still held; a lease that expired is
  reported as lost (``renew`` returns False), never silently extended;
* ``release`` of a lease that was lost frees nothing that another holder owns;
* no backend decides who holds a slot by a client's wall clock (expiry is the
  server's: its ``TIME``/``now()``, a lease TTL, a session), and
  :meth:`Lease.is_valid` never reads a wall clock either: it compares the local
  monotonic clock with the start of the last request the server confirmed the
  lease in, plus the TTL (Redlock's rule), so a host whose clock is moved can
  neither be granted a held slot nor believe it still holds a lost one.

Error handling: a backend translates its client's errors into
:class:`~django_celery_adv.exceptions.LockError` (chained with ``from``), so
callers handle one family whatever server is behind the lock.
"""

from __future__ import annotations

import abc
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ...exceptions import LockError
from ...masking import mask_text

#: Read once: a lock round should not pay a system call for it.
HOSTNAME = socket.gethostname()


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: stored with it so anyone can list the holders."""

    task_id: str | None = None
    hostname: str = field(default_factory=lambda: HOSTNAME)
    pid: int = field(default_factory=os.getpid)

    def as_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "hostname": self.hostname, "pid": self.pid}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Holder:
        return cls(task_id=data.get("task_id"), hostname=str(data.get("hostname", "")),
                   pid=int(data.get("pid") or 0))


@dataclass(eq=False)
class Lease:
    """One granted slot of a lock. Mutable only by its backend and heartbeat."""

    name: str
    slot: int
    token: int
    holder: Holder
    acquired_at: datetime
    expires_at: datetime
    #: Seconds each grant or renewal keeps the lease alive.
    ttl: float = 60.0
    backend: str = "default"
    #: Backend-private handle (a ZooKeeper recipe, an etcd lease id ...).
    handle: Any = field(default=None, repr=False, compare=False)
    lost: bool = False
    on_lost: Callable[[Lease], None] | None = field(default=None, repr=False)
    #: ``time.monotonic()`` past which this process stops counting on the lease:
    #: when the last request that the server confirmed it in was *sent*, plus
    #: the TTL (see :meth:`confirm`). 0 for leases read by ``holders()``.
    valid_until: float = field(default=0.0, repr=False)
    #: The process that was granted the lease: only it renews or releases it
    #: (a forked child inherits the object, not the lease).
    owner_pid: int = field(default_factory=os.getpid, repr=False)
    _lost_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def is_valid(self) -> bool:
        """True while this process may count on the lease: not lost, not past
        ``valid_until`` by the local monotonic clock. Wall clocks play no part."""
        return not self.lost and time.monotonic() < self.valid_until

    def confirm(self, sent_at: float, seconds: float) -> None:
        """The server granted or renewed the lease in a request sent at
        ``sent_at`` (``time.monotonic()`` read *before* sending): it is valid
        for ``seconds`` from then, never from when the reply arrived."""
        self.valid_until = sent_at + seconds

    def remaining(self) -> float:
        """Seconds of validity left by the monotonic clock (negative once past)."""
        return self.valid_until - time.monotonic()

    def mark_lost(self) -> bool:
        """Flag the lease lost once; returns True for the caller that flagged it."""
        with self._lost_lock:
            if self.lost:
                return False
            self.lost = True
            return True


def utcnow() -> datetime:
    return datetime.now(UTC)


def from_timestamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


class LockBackend(abc.ABC):
    """Base of the lock backends: five methods, one module per server.

    Subclasses create their client lazily (after fork in prefork children)
    and must be safe to use from several threads of one process.
    """

    #: OPTIONS keys without which the backend cannot work (system check E012).
    required_options: tuple[str, ...] = ()
    #: The client library's exceptions that :meth:`translate_errors` turns into
    #: ``LockError``; anything else is a bug and propagates as it is.
    client_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        self.alias = alias
        self.options = dict(options)

    @abc.abstractmethod
    def acquire(self, name: str, capacity: int, holder: Holder, ttl: float) -> Lease | None:
        """Grant a free slot of ``name`` or return None at once if all are held."""

    @abc.abstractmethod
    def release(self, lease: Lease) -> None:
        """Give the slot back; a lease that is no longer held is a no-op."""

    @abc.abstractmethod
    def renew(self, lease: Lease) -> bool:
        """Push ``expires_at`` one TTL ahead; False if the lease was lost."""

    @abc.abstractmethod
    def holders(self, name: str) -> list[Lease]:
        """The live leases of ``name``, in slot order."""

    @abc.abstractmethod
    def force_release(self, name: str, token: int) -> bool:
        """Free the slot granted with ``token`` whoever holds it (admin action)."""

    @contextmanager
    def translate_errors(self, name: str | None = None) -> Iterator[None]:
        """The one way a backend reports a client failure: ``LockError`` naming
        the backend (``describe()``, no secrets) and the lock, chained ``from``."""
        try:
            yield
        except self.client_errors as e:
            detail = mask_text(str(getattr(e, "detail_text", None) or e))
            where = f", lock {name!r}" if name is not None else ""
            raise LockError(f"lock backend {self.alias!r} ({self.describe()}){where}: "
                            f"{type(e).__name__}: {detail}") from e

    def close(self) -> None:  # noqa: B027 (optional hook; most backends need it)
        """Drop client connections (tests, process shutdown)."""

    def describe(self) -> str:
        """Where the backend points, with no secret in it (admin, status output)."""
        return type(self).__name__
