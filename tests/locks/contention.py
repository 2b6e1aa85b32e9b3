"""Acquirers hammering one lock, counted outside the lock code: the shared harnesses.

:func:`contend` runs threads of one process on one backend instance;
:func:`contend_processes` runs forked processes, each with its own backend
made by a factory, and counts concurrent holders in Redis (the test settings'
``REDIS_URL``, not the lock server). Either way the count of concurrent holders
is kept by the harness itself, so a backend that over-grants cannot hide it,
and every grant's token is recorded so duplicates show.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from django.conf import settings
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
    #: Exit codes of the processes of :func:`contend_processes` (None: still running).
    exitcodes: list[int | None] = field(default_factory=list)


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


def _process_body(factory: Callable[[], LockBackend], name: str, capacity: int, rounds: int,
                  key: str, hold: float, idle: float, ttl: float) -> None:
    """One forked acquirer: ``rounds`` grants, each counted in Redis while held."""
    counter = redis.Redis.from_url(settings.REDIS_URL)
    try:
        backend = factory()
        holder = Holder(task_id=f"p{os.getpid()}", hostname="contention-host")
        done = 0
        while done < rounds:
            lease = backend.acquire(name, capacity, holder, ttl)
            if lease is None:
                time.sleep(idle)
                continue
            if lease.owner_pid != os.getpid():
                raise AssertionError(f"lease owner_pid {lease.owner_pid} != {os.getpid()}")
            # The count is taken after the grant and dropped before the release:
            # a peak above capacity can only come from an over-grant.
            counter.rpush(f"{key}:seen", counter.incr(f"{key}:now"))
            counter.rpush(f"{key}:tokens", lease.token)
            time.sleep(hold)
            counter.decr(f"{key}:now")
            backend.release(lease)
            done += 1
        backend.close()
    except BaseException:
        counter.rpush(f"{key}:errors", traceback.format_exc())
        raise
    finally:
        connections.close_all()


def contend_processes(factory: Callable[[], LockBackend], name: str, capacity: int, *,
                      processes: int = 16, rounds: int = 8, hold: float = 0.002,
                      idle: float = 0.003, ttl: float = 30,
                      timeout: float = 180) -> Contention:
    """Fork ``processes`` acquirers on ``name``, each getting ``rounds`` grants
    through its own ``factory()`` backend; count what they saw in Redis."""
    counter = redis.Redis.from_url(settings.REDIS_URL)
    key = f"contention:{uuid.uuid4().hex[:12]}"
    connections.close_all()  # the children must not share the parent's database socket
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_process_body,
                                args=(factory, name, capacity, rounds, key, hold, idle, ttl))
                for _ in range(processes)]
    for child in children:
        child.start()
    deadline = time.monotonic() + timeout
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.is_alive():  # a hung acquirer fails the run, it does not hang it
            child.kill()
            child.join(10)
    seen = [int(n) for n in counter.lrange(f"{key}:seen", 0, -1)]
    result = Contention(
        grants=len(seen), peak=max(seen, default=0), over=sum(n > capacity for n in seen),
        tokens=[int(t) for t in counter.lrange(f"{key}:tokens", 0, -1)],
        errors=[RuntimeError(text.decode()) for text in counter.lrange(f"{key}:errors", 0, -1)],
        exitcodes=[child.exitcode for child in children])
    counter.delete(*(f"{key}:{part}" for part in ("seen", "now", "tokens", "errors")))
    counter.close()
    return result
