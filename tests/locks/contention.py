"""Threads hammering one lock, counted outside the lock code: the shared harness.

Every backend's stress test drives its backend through :func:`contend` and
asserts on the returned counts; the count of concurrent holders is kept by the
harness itself, so a backend that over-grants cannot hide it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from django.db import connections

from django_celery_adv.locks.backends.base import Holder, LockBackend


@dataclass
class Contention:
    grants: int = 0
    peak: int = 0
    #: Grants made while ``capacity`` others already held the lock.
    over: int = 0
    tokens: list[int] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


def contend(backend: LockBackend, name: str, capacity: int, *, threads: int = 16,
            rounds: int | None = None, attempts: int | None = None,
            seconds: float | None = None, hold: float = 0.001, idle: float = 0.002,
            ttl: float = 30, already_held: int = 0) -> Contention:
    """Run ``threads`` acquirers on ``name`` and count what they saw.

    Each thread either keeps going until it got ``rounds`` grants, or stops
    after ``attempts`` tries (or once ``seconds`` have passed). ``already_held``
    counts leases taken before the threads start.
    """
    result = Contention(peak=already_held)
    active = already_held
    guard = threading.Lock()
    deadline = None if seconds is None else time.monotonic() + seconds

    def work(index: int) -> None:
        nonlocal active
        holder = Holder(task_id=f"w{index}", hostname="contention-host", pid=4242)
        try:
            granted = tried = 0
            while (granted < rounds) if rounds is not None else (tried < attempts):
                tried += 1
                lease = backend.acquire(name, capacity, holder, ttl)
                if lease is None:
                    time.sleep(idle)
                    continue
                with guard:
                    active += 1
                    result.grants += 1
                    result.over += active > capacity
                    result.peak = max(result.peak, active)
                    result.tokens.append(lease.token)
                time.sleep(hold)
                with guard:
                    active -= 1
                backend.release(lease)
                granted += 1
                if deadline is not None and time.monotonic() > deadline:
                    return
        except BaseException as e:  # reported by the caller's assertions
            result.errors.append(e)
        finally:
            connections.close_all()  # this thread's own database connection, if any

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(120)
    return result
