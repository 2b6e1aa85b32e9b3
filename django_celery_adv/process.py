"""Per-process state, and the one mechanism that resets it in a forked child.

Prefork workers, ``worker_max_tasks_per_child`` re-forks, tasks that fork and a
beat embedded in a worker all fork a process that may hold clients, threads
and leases. A child must start clean: its parent's sockets are not its own
(closing them would tear down the parent's sessions, using them would mix two
processes' traffic), a lock inherited held by a thread that does not exist in
the child would never be released, and a lease granted to the parent is the
parent's alone to renew or release.

Guarantees:

* every callback given to :func:`after_fork` runs in each forked child,
  before any code of the child runs (``os.register_at_fork``), in the order
  the callbacks were registered;
* a :class:`PerProcess` value is made on first use in each process and never
  crosses a fork: the child makes its own, the parent's is dropped unclosed;
* a :class:`ForkSafeLock` is never inherited held: the child gets a new one.

Only ``os.fork()`` (and what uses it: multiprocessing's ``fork`` context,
billiard's prefork pool) is covered; ``spawn`` children start from scratch anyway.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

_callbacks: list[Callable[[], None]] = []


def after_fork(callback: Callable[[], None]) -> Callable[[], None]:
    """Run ``callback`` in every forked child (usable as a decorator)."""
    _callbacks.append(callback)
    return callback


def _run_after_fork() -> None:
    for callback in _callbacks:
        try:
            callback()
        except Exception:  # one failing reset must not leave the others undone
            logging.getLogger(__name__).exception("after-fork reset %r failed", callback)


os.register_at_fork(after_in_child=_run_after_fork)


class ForkSafeLock:
    """A ``threading.Lock`` that a forked child gets anew: a lock inherited held
    by a thread the child does not have would never be released there."""

    _instances: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        ForkSafeLock._instances.add(self)

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


class PerProcess(Generic[T]):
    """A value made lazily once per process: a client, a connection pool.

    ``get()`` is safe from several threads; the factory runs once per process.
    In a forked child the parent's value is forgotten without ``close`` (its
    sockets belong to the parent) and the guard lock is new (the parent's may
    have been held by a thread the child does not have).
    """

    _instances: weakref.WeakSet[PerProcess] = weakref.WeakSet()

    def __init__(self, factory: Callable[[], T],
                 close: Callable[[T], None] | None = None) -> None:
        self._factory = factory
        self._close = close
        self._value: T | None = None
        self._guard = threading.Lock()
        PerProcess._instances.add(self)

    def get(self) -> T:
        value = self._value
        if value is not None:
            return value
        with self._guard:
            if self._value is None:
                self._value = self._factory()
            return self._value

    def peek(self) -> T | None:
        """This process's value if it was made, without making it."""
        return self._value

    def close(self) -> None:
        """Close and forget this process's value; the next ``get`` makes a new one."""
        with self._guard:
            value, self._value = self._value, None
        if value is not None and self._close is not None:
            self._close(value)

    def _forget(self) -> None:
        self._value = None
        self._guard = threading.Lock()


@after_fork
def _forget_all() -> None:
    for instance in list(PerProcess._instances):
        instance._forget()
    for lock in list(ForkSafeLock._instances):
        lock._lock = threading.Lock()
