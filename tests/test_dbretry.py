"""Transactions the database aborts to break a conflict are run again, others are not."""

from __future__ import annotations

from unittest import mock

import pytest
from django.db import DatabaseError, OperationalError

from django_celery_adv import failures
from django_celery_adv.dbretry import ATTEMPTS, aborted_by_database, run_again_if_aborted
from django_celery_adv.models import TaskFailure


class _Driver(Exception):
    """Stands for a database driver's exception (what Django chains as __cause__)."""

    def __init__(self, *args, sqlstate=None):
        super().__init__(*args)
        self.sqlstate = sqlstate


def _aborted(cause: _Driver) -> DatabaseError:
    error = OperationalError(str(cause))
    error.__cause__ = cause
    return error


DEADLOCK_MARIADB = _Driver(1213, "Deadlock found when trying to get lock")
SERIALIZATION_PG = _Driver("could not serialize access", sqlstate="40001")


@pytest.mark.parametrize("cause", [DEADLOCK_MARIADB, SERIALIZATION_PG, _Driver(sqlstate="40P01")])
def test_aborts_are_recognised(cause):
    assert aborted_by_database(_aborted(cause))


def test_other_errors_are_not_retried():
    calls = []

    def fails():
        calls.append(1)
        raise _aborted(_Driver(1146, "Table doesn't exist"))

    with pytest.raises(OperationalError):
        run_again_if_aborted(fails)
    assert calls == [1]


def test_an_abort_every_time_gives_up_after_the_attempts():
    calls = []

    def always_aborted():
        calls.append(1)
        raise _aborted(DEADLOCK_MARIADB)

    with pytest.raises(OperationalError):
        run_again_if_aborted(always_aborted)
    assert len(calls) == ATTEMPTS


@pytest.mark.django_db(transaction=True)
def test_a_failure_whose_transaction_deadlocked_once_is_still_recorded():
    # InnoDB at REPEATABLE READ: the update of a missing row takes a gap lock and
    # two recorders' inserts deadlock; one of them is rolled back (seen on MariaDB).
    real = failures._increment_or_create
    deadlocks = [_aborted(DEADLOCK_MARIADB)]

    def first_one_deadlocks(*args, **kwargs):
        if deadlocks:
            raise deadlocks.pop()
        return real(*args, **kwargs)

    occurrence = failures.Occurrence(task_name="t.deadlocked", exception_type="ValueError",
                                     location="tasks.py:run")
    with mock.patch.object(failures, "_increment_or_create", first_one_deadlocks):
        group = failures.record(occurrence)
    assert TaskFailure.objects.get(pk=group.pk).count == 1
    assert group.days.get().count == 1
