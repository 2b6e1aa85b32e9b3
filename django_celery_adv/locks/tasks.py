"""Locks for Celery tasks: the ``@locked`` decorator and the ``LockedTask`` base.

A task that finds every slot held first polls for up to the lock's ``wait``
seconds (a slot often frees within milliseconds), then goes back to the queue
with the lock's countdown plus random jitter, or is dropped when the lock's
``on_busy`` says so. Lock retries keep the task's own ``retries`` count and
``max_retries`` untouched: they are counted in a message header against the
lock's ``max_retries`` (None = forever), after which ``LockUnavailable`` is
raised. A lock server that is down is handled like a busy lock, logged at
WARNING, so no task is lost.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from celery import current_task
from celery.exceptions import Retry

from ..exceptions import LockError, LockUnavailable
from ..registry import RoutedTask
from .api import acquire_waiting, describe_holder, hold, retry_countdown
from .backends.base import Holder
from .definitions import LockPolicy, policies
from .operations import holders

logger = logging.getLogger("django_celery_adv.locks")

#: Message header that counts a task's lock retries.
LOCK_RETRIES_HEADER = "x-lock-retries"


def run_locked(task: RoutedTask, name: str, capacity: int, body: Callable[[], Any],
               on_busy: str | None = None) -> Any:
    """Run ``body`` holding a slot of ``name`` on behalf of ``task``."""
    policy = policies.get(name, capacity, on_busy=on_busy)
    error: LockError | None = None
    try:
        # A duplicate to be dropped is dropped at once, not after waiting.
        wait = 0 if policy.on_busy == "drop" else policy.wait
        lease = acquire_waiting(policy, Holder(task_id=task.request.id), wait)
    except LockError as e:
        lease, error = None, e
    if lease is None:
        policy = policies.current(policy)
        if error is None and policy.on_busy == "drop":
            if policy.paused:
                logger.info("%s: dropped %s[%s]", policy.busy_reason(), task.name,
                            task.request.id)
            else:
                logger.info("%s: dropped %s[%s]; held by %s", policy.busy_reason(), task.name,
                            task.request.id, ", ".join(_holder_ids(policy)) or "unknown")
            return None
        defer(task, policy, error)
    with hold(lease):
        return body()


def defer(task: RoutedTask, policy: LockPolicy, error: LockError | None) -> None:
    """Send the task back to the queue for a later lock attempt (raises ``Retry``)."""
    request = task.request
    reason = f"lock {policy.name!r} unavailable: {error}" if error else policy.busy_reason()
    if request.called_directly:
        raise LockUnavailable(reason) from error
    headers = dict(request.headers or {})
    attempt = int(headers.get(LOCK_RETRIES_HEADER)
                  or getattr(request, LOCK_RETRIES_HEADER.replace("-", "_"), 0) or 0)
    if policy.max_retries is not None and attempt >= policy.max_retries:
        raise LockUnavailable(f"{reason}; gave up after {attempt} lock retries") from error
    if error is not None:
        logger.warning("%s[%s]: %s; retrying", task.name, request.id, reason)
    countdown = retry_countdown(policy, attempt)
    headers[LOCK_RETRIES_HEADER] = attempt + 1
    signature = task.signature_from_request(request, countdown=countdown, headers=headers)
    signature.apply_async()
    raise Retry(reason, exc=error, when=countdown)


def _holder_ids(policy: LockPolicy) -> list[str]:
    try:
        return [describe_holder(lease.holder) for lease in
                holders(policy.name, backend=policy.backend)]
    except LockError:
        return []


def locked(name: str, capacity: int = 1, *, on_busy: str | None = None) -> Callable:
    """Hold a slot of ``name`` while the task body runs; place under ``@app.task``.

    ``capacity`` (and ``on_busy``: "retry" or "drop") seed the lock's admin row
    on first use; the row wins afterwards. Works on bound and unbound tasks.
    """

    def decorator(fun: Callable) -> Callable:
        @functools.wraps(fun)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            task = current_task._get_current_object()
            return run_locked(task, name, capacity, lambda: fun(*args, **kwargs), on_busy)

        # Read by the beat scheduler, which skips a periodic task whose lock is full.
        wrapper.lock_name, wrapper.lock_capacity = name, capacity  # type: ignore[attr-defined]
        return wrapper

    return decorator


class LockedTask(RoutedTask):
    """A task that runs ``locked_run`` holding the mutex ``lock_name``.

    ``retry_on_lock = False`` drops a call that finds the lock held (logged at
    INFO with the holder's task id) instead of retrying it later.
    """

    abstract = True
    #: Defaults to the task's name.
    lock_name: str | None = None
    lock_capacity: int = 1
    retry_on_lock: bool = True

    def run(self, *args: Any, **kwargs: Any) -> Any:
        return run_locked(self, self.lock_name or self.name, self.lock_capacity,
                          lambda: self.locked_run(*args, **kwargs),
                          on_busy="retry" if self.retry_on_lock else "drop")

    def locked_run(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("LockedTask subclasses implement locked_run()")
