"""Acquire, hold and give back a lock: the flow shared by ``lock()``, ``@locked``
and ``LockedTask``.

A granted lease is renewed in the background every ``ttl / 3`` seconds by a
heartbeat thread. A renewal the backend refuses means the lease was lost (it
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
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..exceptions import LockError, LockUnavailable
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


class Heartbeat(threading.Thread):
    """Renews one lease every ttl/3 until stopped; reports the lease if lost."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(name=f"lock-heartbeat-{lease.name}-{lease.token}", daemon=True)
        self.lease = lease
        self.stopped = threading.Event()

    def run(self) -> None:
        lease = self.lease
        backend = lock_backends[lease.backend]
        interval = max(lease.ttl / 3, 0.05)
        while not self.stopped.wait(interval):
            try:
                renewed = backend.renew(lease)
            except LockError as e:
                if lease.is_valid():
                    logger.warning("lock %s: renewal failed, will retry: %s", lease.name, e)
                    continue
                renewed = False
            if not renewed:
                report_lost(lease)
                return

    def stop(self) -> None:
        self.stopped.set()


def report_lost(lease: Lease) -> None:
    """Mark the lease lost once: log at ERROR and call its ``on_lost``."""
    if not lease.mark_lost():
        return
    logger.error("lock %s: lease lost (slot %s, token %s, holder %s); the holder may no "
                 "longer be alone", lease.name, lease.slot, lease.token, lease.holder.task_id)
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
        lease.heartbeat = Heartbeat(lease)
        lease.heartbeat.start()
    return lease


def acquire_waiting(policy: LockPolicy, holder: Holder, wait: float,
                    on_lost: Callable[[Lease], None] | None = None) -> Lease | None:
    """Poll for a slot for up to ``wait`` seconds, with jittered backoff."""
    deadline = time.monotonic() + wait
    delay = POLL_MIN
    while True:
        lease = try_acquire(policy, holder, on_lost)
        if lease is not None:
            return lease
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        time.sleep(min(remaining, delay * random.uniform(0.5, 1.5)))
        delay = min(delay * 2, POLL_MAX)


def release(lease: Lease) -> None:
    """Stop the heartbeat and give the slot back (a lost lease frees nothing)."""
    if lease.heartbeat is not None:
        lease.heartbeat.stop()
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
        raise LockUnavailable(f"lock {name!r}: all {policy.capacity} slot(s) are held")
    with hold(lease):
        yield lease


def retry_countdown(policy: LockPolicy, attempt: int) -> float:
    """Countdown before lock retry number ``attempt`` (0-based), jitter included."""
    countdown = policy.retry_countdown
    if policy.retry_backoff:
        countdown = min(countdown * 2 ** attempt, countdown * 10)
    return countdown + random.uniform(0, policy.retry_jitter)
