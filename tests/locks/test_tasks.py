"""``@locked`` and ``LockedTask`` (locks/tasks.py) run through Celery's real
``Task.apply`` on the database lock backend, without a worker.

* a free lock: the body runs holding a lease taken for the task's id, released after;
* a busy lock: the task goes back to the queue (``Retry``) with the lock-retry
  header counted up by one, its own ``retries`` untouched and its own
  ``max_retries`` not consulted; at the lock's ``max_retries`` it fails with
  ``LockUnavailable``;
* ``on_busy="drop"`` (``retry_on_lock = False``): the call returns None and the
  log names the holder (or says the lock is paused);
* a lock server error defers the task like a busy lock, logged at WARNING;
* called directly (not through Celery), a busy lock raises ``LockUnavailable``.

What the re-sent message would carry is read from ``Signature.apply_async``,
which is replaced by a recorder: nothing reaches a broker. Delivery through a
real worker is covered by tests/locks/test_seed_examples.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from unittest import mock

import pytest
from celery.canvas import Signature

from django_celery_adv.exceptions import LockError, LockUnavailable
from django_celery_adv.locks import LockedTask, current_lease, locked
from django_celery_adv.locks.backends import lock_backends
from django_celery_adv.locks.backends.base import Holder, Lease
from django_celery_adv.locks.definitions import policies
from django_celery_adv.locks.tasks import LOCK_RETRIES_HEADER
from django_celery_adv.models import LockDefinition
from django_celery_adv.registry import apps

pytestmark = pytest.mark.django_db(transaction=True)  # lock rows and leases

GUARDED = "tests-locks-tasks-guarded"
runs: list[tuple[object, Lease | None]] = []


@apps["default"].task(name="tests.locks.test_tasks.guarded", bind=True, max_retries=0)
@locked(GUARDED, 1)
def guarded(self, value):
    """max_retries=0: any lock retry counted as a task retry would exceed it."""
    runs.append((value, current_lease()))
    return value


class Importer(LockedTask):
    name = "tests.locks.test_tasks.importer"
    retry_on_lock = False

    def locked_run(self, value):
        runs.append((value, current_lease()))
        return value


importer = apps["default"].register_task(Importer())


@pytest.fixture(autouse=True)
def fresh_state() -> Iterator[None]:
    runs.clear()
    policies.invalidate()
    yield
    policies.invalidate()


@pytest.fixture
def resent() -> Iterator[list[Signature]]:
    """Signatures the task re-sent for a later lock attempt."""
    sent: list[Signature] = []
    with mock.patch.object(Signature, "apply_async", autospec=True,
                           side_effect=lambda signature, *a, **kw: sent.append(signature)):
        yield sent


def define(name: str, **fields) -> LockDefinition:
    values = {"backend": "default", "capacity": 1, "ttl": 30, "wait": 0,
              "retry_countdown": 0.5, "retry_jitter": 0, "retry_backoff": False,
              "max_retries": 3, "on_busy": "retry", **fields}
    definition = LockDefinition.objects.create(name=name, **values)
    policies.invalidate()
    return definition


@pytest.fixture
def held() -> Iterator[Callable[[str], Lease]]:
    """Take a lock for a task 'the-holder' from outside the task under test."""
    leases: list[Lease] = []
    backend = lock_backends["default"]

    def hold(name: str) -> Lease:
        lease = backend.acquire(name, 1, Holder(task_id="the-holder"), 30)
        assert lease is not None
        leases.append(lease)
        return lease

    yield hold
    for lease in leases:
        backend.release(lease)


def test_a_free_lock_runs_the_body_holding_a_lease_for_the_task(resent):
    define(GUARDED)

    result = guarded.apply((7,), task_id="task-free")

    assert result.get() == 7
    [(value, lease)] = runs
    assert value == 7 and lease is not None
    assert (lease.name, lease.holder.task_id) == (GUARDED, "task-free")
    assert lock_backends["default"].holders(GUARDED) == []  # released after the body
    assert resent == []


def test_a_busy_lock_resends_with_the_lock_retry_counted_in_a_header(held, resent):
    define(GUARDED)
    held(GUARDED)

    result = guarded.apply((1,), task_id="task-busy", retries=4,
                           headers={LOCK_RETRIES_HEADER: 1})

    assert result.state == "RETRY"
    assert runs == []
    [signature] = resent
    assert signature.options["headers"][LOCK_RETRIES_HEADER] == 2
    assert signature.options["retries"] == 4  # the task's own count is untouched
    assert signature.options["task_id"] == "task-busy"
    assert signature.options["countdown"] == pytest.approx(0.5)
    assert signature.args == (1,)


def test_the_first_lock_retry_starts_the_header_at_one(held, resent):
    define(GUARDED)
    held(GUARDED)

    assert guarded.apply((1,), task_id="task-first").state == "RETRY"

    [signature] = resent
    assert signature.options["headers"][LOCK_RETRIES_HEADER] == 1
    assert signature.options["retries"] == 0


def test_the_locks_max_retries_ends_the_retries_with_lock_unavailable(held, resent):
    define(GUARDED, max_retries=2)
    held(GUARDED)

    with pytest.raises(LockUnavailable, match="gave up after 2 lock retries"):
        guarded.apply((1,), task_id="task-done", headers={LOCK_RETRIES_HEADER: 2},
                      throw=True)

    assert resent == [] and runs == []


def test_drop_on_busy_returns_none_and_logs_the_holder(held, resent, caplog):
    define(GUARDED, on_busy="drop")
    held(GUARDED)

    with caplog.at_level(logging.INFO, logger="django_celery_adv.locks"):
        result = guarded.apply((1,), task_id="task-dup")

    assert (result.state, result.get()) == ("SUCCESS", None)
    assert runs == [] and resent == []
    [record] = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert "task-dup" in record.getMessage() and "the-holder" in record.getMessage()


def test_drop_on_a_paused_lock_says_paused(resent, caplog):
    define(GUARDED, on_busy="drop", capacity=0)

    with caplog.at_level(logging.INFO, logger="django_celery_adv.locks"):
        assert guarded.apply((1,), task_id="task-paused").get() is None

    [message] = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert "paused" in message and "held by" not in message
    assert runs == [] and resent == []


def test_locked_task_without_retry_on_lock_drops_a_duplicate(held, resent):
    held(Importer.name)  # lock_name defaults to the task's name

    result = importer.apply(("a",), task_id="task-import")

    assert result.get() is None
    assert runs == [] and resent == []
    assert LockDefinition.objects.get(name=Importer.name).on_busy == "drop"
    held_by = [lease.holder.task_id for lease in lock_backends["default"].holders(Importer.name)]
    assert held_by == ["the-holder"]


def test_a_lock_server_error_defers_the_task_and_warns(resent, caplog):
    define(GUARDED)
    backend = lock_backends["default"]

    with mock.patch.object(backend, "acquire", side_effect=LockError("server down")), \
            caplog.at_level(logging.WARNING, logger="django_celery_adv.locks"):
        result = guarded.apply((1,), task_id="task-down")

    assert result.state == "RETRY"
    [signature] = resent
    assert signature.options["headers"][LOCK_RETRIES_HEADER] == 1
    assert any(r.levelno == logging.WARNING and "server down" in r.getMessage()
               and "task-down" in r.getMessage() for r in caplog.records)
    assert runs == []


def test_called_directly_a_busy_lock_raises_lock_unavailable(held, resent):
    define(GUARDED)
    held(GUARDED)

    with pytest.raises(LockUnavailable, match="busy"):
        guarded(1)

    assert runs == [] and resent == []


def test_called_directly_a_free_lock_runs_the_body():
    define(GUARDED)

    assert guarded(5) == 5
    assert runs[0][0] == 5 and runs[0][1].name == GUARDED
    assert lock_backends["default"].holders(GUARDED) == []


def test_beat_finds_the_lock_of_a_locked_task_and_of_a_locked_task_class():
    from django_celery_adv.beat.scheduler import task_lock

    assert task_lock(guarded) == (GUARDED, 1)
    assert task_lock(importer) == (importer.lock_name or importer.name, 1)
    assert task_lock(apps["default"].tasks["celery.backend_cleanup"]) is None
