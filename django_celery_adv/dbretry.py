"""Recognise a transaction the database aborted to break a conflict, and run it again.

PostgreSQL (serialization failures at REPEATABLE READ / SERIALIZABLE, deadlocks)
and InnoDB (deadlocks from gap locks at its default REPEATABLE READ) roll one
side of a conflict back and expect the application to run it again. The
database lock backend and task-failure recording both do so here.

Guarantee: only those aborts are retried (PostgreSQL SQLSTATE 40001/40P01,
MariaDB/MySQL errors 1213/1020), at most ``ATTEMPTS`` runs in all; any other
error, and the last abort, propagate unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from django.db import DatabaseError

T = TypeVar("T")

#: Runs of a transaction the database aborted to break a conflict.
ATTEMPTS = 3
#: PostgreSQL SQLSTATEs and MariaDB/MySQL error numbers of such aborts.
ABORTED_SQLSTATES = frozenset({"40001", "40P01"})
ABORTED_MYSQL_ERRORS = frozenset({1213, 1020})  # deadlock; record changed (snapshot isolation)


def aborted_by_database(error: DatabaseError) -> bool:
    """True when the database rolled the transaction back to break a conflict
    (serialization failure, deadlock): running it again is the cure."""
    cause = error.__cause__
    if getattr(cause, "sqlstate", None) in ABORTED_SQLSTATES:
        return True
    args = getattr(cause, "args", ())
    return bool(args) and args[0] in ABORTED_MYSQL_ERRORS


def run_again_if_aborted(transaction: Callable[[], T], attempts: int = ATTEMPTS) -> T:
    """``transaction()`` (a whole ``atomic`` block), run again while the database
    aborts it to break a conflict, at most ``attempts`` times in all."""
    for attempt in range(1, attempts + 1):
        try:
            return transaction()
        except DatabaseError as e:
            if attempt == attempts or not aborted_by_database(e):
                raise
    raise AssertionError("unreachable")  # pragma: no cover
