"""Acquire, hold and give back a lock: the flow shared by ``lock()``, ``@locked``
and ``LockedTask``.

A granted lease is renewed in the background about every ``ttl / 3`` seconds
by the process's heartbeat thread. A renewal the backend refuses means the lease was lost (it
expired, or the ZooKeeper session ended): that is logged at ERROR, the lease's
``is_valid()`` turns False and its ``on_lost`` callback runs. It is never
silently re-acquired. A renewal that fails with a server error is tried again
until the lease's own expiry passes; then the lease is lost too.

Error handling: backend failures arrive as ``LockError``. ``lock()`` lets them
propagate; the task helpers turn them into a task retry, so a lock server that
is down delays tasks instead of failing them.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from django.db import close_old_connections, connections

from ..exceptions import LockError, LockUnavailable
from ..process import after_fork
from .backends import lock_backends
from .backends.base import Holder, Lease
from .definitions import LockPolicy, policies

logger = logging.getLogger("django_celery_adv.locks")

#: Polling for a free slot: first pause and the cap of its doubling. Short
#: enough that a freed slot rarely idles (a round trip costs ~0.3-2 ms).
POLL_MIN, POLL_MAX = 0.001, 0.01

_current_lease: contextvars.ContextVar[Lease | None] = contextvars.ContextVar(
    "django_celery_adv_current_lease", default=None)


def current_lease() -> Lease | None:
    """The lease held by the running ``@locked`` task or ``lock()`` block, if any."""
    return _current_lease.get()


class _BackendHeartbeat:
    """One thread renewing every lease this process holds on one lock backend.

    Registering a lease is a dict insert and a notify, so holding a lock costs
    no thread start. The thread starts lazily. The thread survives anything a
    renewal raises. A renewal that fails is tried again (sooner, as the
    lease's validity runs out) until the lease's own validity has passed; only
    then is the lease reported lost. Renewals on one backend run one after
    another, so a server that hangs delays only the leases it holds (at most by
    its client's timeout); the other backends have threads of their own.
    """

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self._due: dict[int, tuple[float, Lease]] = {}
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")

    def add(self, lease: Lease) -> None:
        due_at = time.monotonic() + _interval(lease)
        with self._wakeup:
            self._due[id(lease)] = (due_at, lease)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"lock-heartbeat-{self.alias}")
                self._thread.start()
            elif due_at < self._wake_at:  # else the thread wakes early enough anyway
                self._wakeup.notify()

    def discard(self, lease: Lease) -> None:
        with self._wakeup:
            self._due.pop(id(lease), None)

    def held(self) -> list[Lease]:
        """The leases this process is renewing now."""
        with self._wakeup:
            return [lease for _, lease in self._due.values()]

    def _run(self) -> None:
        while True:
            try:
                self._beat()
            except Exception:  # never let the thread die: held leases depend on it
                logger.exception("lock heartbeat: unexpected error; continuing")
                time.sleep(0.1)

    def _beat(self) -> None:
        with self._wakeup:
            now = time.monotonic()
            due = [lease for at, lease in self._due.values() if at <= now]
            if not due:
                if not self._due:
                    # Idle: close what Django connections this thread opened
                    # (an on_lost callback may use the ORM) rather than keep
                    # them, unused, for the life of the process.
                    connections.close_all()
                self._wake_at = min((at for at, _ in self._due.values()), default=now + 60)
                self._wakeup.wait(self._wake_at - now)
                self._wake_at = float("-inf")  # awake: every add may need a look
                return
            for lease in due:  # renewed below; rescheduled only if still held
                self._due[id(lease)] = (now + _interval(lease), lease)
        close_old_connections()  # as Django does per request (for on_lost callbacks)
        for lease in due:
            self._renew(lease)

    def _renew(self, lease: Lease) -> None:
        try:
            renewed = lock_backends[lease.backend].renew(lease)
        except Exception as e:
            if lease.is_valid():
                retry_in = max(min(_interval(lease), lease.remaining() / 3), 0.05)
                logger.warning("lock %s: renewal failed, retrying in %.2f s: %s",
                               lease.name, retry_in, e)
                self._reschedule(lease, time.monotonic() + retry_in)
                return
            renewed = False
        if not renewed and self._holds(lease):  # released meanwhile: not lost
            self.discard(lease)
            report_lost(lease)

    def _reschedule(self, lease: Lease, at: float) -> None:
        with self._wakeup:
            if self._due.get(id(lease), (0, None))[1] is lease:
                self._due[id(lease)] = (at, lease)

    def _holds(self, lease: Lease) -> bool:
        with self._wakeup:
            return self._due.get(id(lease), (0, None))[1] is lease


def _interval(lease: Lease) -> float:
    # A third of what the lease is confirmed for: the TTL, or less where the
    # server bounds validity otherwise (ZooKeeper: the session timeout).
    return max(min(lease.ttl, lease.remaining()) / 3, 0.05)


class Heartbeat:
    """Renews every lease this process was granted, about every third of its
    validity, with one thread per lock backend (see :class:`_BackendHeartbeat`).

    In a forked child the heartbeat starts empty
    (:func:`~django_celery_adv.process.after_fork`): the parent's leases are
    the parent's to renew, and the parent's locks may have been held by a
    thread the child does not have.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._beats: dict[str, _BackendHeartbeat] = {}
        self._guard = threading.Lock()

    def beat(self, alias: str) -> _BackendHeartbeat:
        with self._guard:
            if alias not in self._beats:
                self._beats[alias] = _BackendHeartbeat(alias)
            return self._beats[alias]

    def add(self, lease: Lease) -> None:
        self.beat(lease.backend).add(lease)

    def discard(self, lease: Lease) -> None:
        beat = self._beats.get(lease.backend)
        if beat is not None:
            beat.discard(lease)

    def held(self) -> list[Lease]:
        """The leases this process is renewing now."""
        return [lease for beat in list(self._beats.values()) for lease in beat.held()]


heartbeat = Heartbeat()
after_fork(heartbeat._reset)


def describe_holder(holder: Holder) -> str:
    """Who holds a lease, from what the backend stores, for log lines and pages:
    ``task <id> on host <host> (pid <pid>)``, or without the task outside one."""
    where = f"host {holder.hostname or '?'} (pid {holder.pid})"
    return f"task {holder.task_id} on {where}" if holder.task_id else where


def report_lost(lease: Lease) -> None:
    """Mark the lease lost once: log at ERROR and call its ``on_lost``."""
    if not lease.mark_lost():
        return
    logger.error("lock %s: lease lost (slot %s, token %s, held by %s); the holder may no "
                 "longer be alone", lease.name, lease.slot, lease.token,
                 describe_holder(lease.holder))
    if lease.on_lost is not None:
        try:
            lease.on_lost(lease)
        except Exception:
            logger.exception("lock %s: on_lost callback failed", lease.name)


def try_acquire(policy: LockPolicy, holder: Holder,
                on_lost: Callable[[Lease], None] | None = None) -> Lease | None:
    """One non-blocking attempt; a granted lease comes with its heartbeat running."""
    lease = lock_backends[policy.backend].acquire(policy.name, policy.capacity, holder,
                                                  policy.ttl)
    if lease is not None:
        lease.on_lost = on_lost
        heartbeat.add(lease)
    return lease


def acquire_waiting(policy: LockPolicy, holder: Holder, wait: float,
                    on_lost: Callable[[Lease], None] | None = None) -> Lease | None:
    """Poll for a slot for up to ``wait`` seconds, with jittered backoff.

    Each attempt uses the policy as the admin has it now, so raising the
    capacity (or unpausing) lets a waiting caller in at its next attempt.
    """
    deadline = time.monotonic() + wait
    delay = POLL_MIN
    while True:
        policy = policies.current(policy)
        lease = try_acquire(policy, holder, on_lost)
        if lease is not None:
            return lease
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        time.sleep(min(remaining, delay * random.uniform(0.5, 1.5)))
        delay = min(delay * 2, POLL_MAX)


def release(lease: Lease) -> None:
    """Stop the heartbeat and give the slot back (a lost lease frees nothing).

    Only the process that was granted the lease gives it back: a forked child
    unwinding a ``with lock()`` block it inherited leaves the parent's slot alone.
    """
    if lease.owner_pid != os.getpid():
        return
    heartbeat.discard(lease)
    try:
        lock_backends[lease.backend].release(lease)
    except LockError as e:
        # The slot frees itself within its TTL; the caller's work is done.
        logger.warning("lock %s: release failed, the slot frees at expiry: %s", lease.name, e)


@contextmanager
def hold(lease: Lease) -> Iterator[Lease]:
    """Expose ``lease`` as ``current_lease()`` for the block, then release it."""
    token = _current_lease.set(lease)
    try:
        yield lease
    finally:
        _current_lease.reset(token)
        release(lease)


@contextmanager
def lock(name: str, blocking: bool = False, timeout: float | None = None, *,
         capacity: int = 1, on_lost: Callable[[Lease], None] | None = None,
         holder: Holder | None = None) -> Iterator[Lease]:
    """Hold a slot of ``name`` for the block, from any code (views, scripts, beat).

    Non-blocking by default: raises ``LockUnavailable`` at once if every slot is
    held. ``blocking=True`` waits up to ``timeout`` seconds (None: forever).
    ``capacity`` only seeds the admin row; the row's capacity wins.
    """
    policy = policies.get(name, capacity)
    holder = holder or Holder()
    if not blocking:
        lease = try_acquire(policy, holder, on_lost)
    else:
        lease = None
        deadline = None if timeout is None else time.monotonic() + timeout
        while lease is None:
            remaining = 3600.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                break
            lease = acquire_waiting(policies.get(name, capacity), holder,
                                    min(remaining, 5.0), on_lost)
    if lease is None:
        raise LockUnavailable(policies.current(policy).busy_reason())
    with hold(lease):
        yield lease


def retry_countdown(policy: LockPolicy, attempt: int) -> float:
    """Countdown before lock retry number ``attempt`` (0-based), jitter included."""
    countdown = policy.retry_countdown
    if policy.retry_backoff:
        countdown = min(countdown * 2 ** attempt, countdown * 10)
    return countdown + random.uniform(0, policy.retry_jitter)
