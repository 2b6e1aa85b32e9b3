"""Database lock backend: what is particular to SQL databases.

The generic contract (lowest free slot, capacity 0, lowered capacity, tokens
grow, expiry) is in ``test_contract.py``. Here: the isolation level the
project runs at (the first use of a name from several processes, a capacity-1
race), the fence upsert, the backend's own READ COMMITTED connection, the
monotonic validity and the per-database transaction modes.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import os
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator
from unittest import mock

import pytest
from django.conf import settings
from django.db import DatabaseError, OperationalError, connections, transaction
from django.db.utils import load_backend
from django.test import override_settings
from django.utils.dateparse import parse_datetime

from django_celery_adv.exceptions import LockError
from django_celery_adv.locks.backends import create_backend
from django_celery_adv.locks.backends import database as database_module
from django_celery_adv.locks.backends.base import Holder
from django_celery_adv.locks.checks_database import check_database_lock_backend
from django_celery_adv.models import LockFence, LockLease

pytestmark = pytest.mark.db

BACKEND = "django_celery_adv.locks.backends.database.DatabaseBackend"
VENDOR = connections["default"].vendor
PROCESSES = 6


def isolation_levels() -> list:
    """What the project may configure for the alias (OPTIONS), per database."""
    if VENDOR == "postgresql":
        from django.db.backends.postgresql.psycopg_any import IsolationLevel

        return [IsolationLevel.READ_COMMITTED, IsolationLevel.REPEATABLE_READ,
                IsolationLevel.SERIALIZABLE]
    if VENDOR == "mysql":
        return ["read committed", "repeatable read", "serializable"]
    return ["DEFERRED", "IMMEDIATE"]  # SQLite: always serializable; its transaction modes


def level_name(level) -> str:
    """'repeatable read' for IsolationLevel.REPEATABLE_READ or 'repeatable read'."""
    return str(getattr(level, "name", level)).lower().replace("_", " ")


def configure_default(level) -> None:
    """Make this (forked) process's default alias run at ``level``."""
    options = connections["default"].settings_dict["OPTIONS"]
    options["transaction_mode" if VENDOR == "sqlite" else "isolation_level"] = level
    connections["default"].close()


def isolation_in_effect(alias: str) -> str:
    """The level a transaction on ``alias`` runs at (SQLite: its transaction mode)."""
    connection = connections[alias]
    if VENDOR == "sqlite":
        connection.ensure_connection()  # the mode is read from OPTIONS on connecting
        return str(connection.transaction_mode).lower()
    if VENDOR == "postgresql":
        query = "SHOW transaction_isolation"
    else:
        query = "SELECT @@tx_isolation" if connection.mysql_is_mariadb else \
            "SELECT @@transaction_isolation"
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        cursor.execute(query)
        return cursor.fetchone()[0].lower().replace("-", " ")


def new_backend():
    return create_backend("default", {"BACKEND": BACKEND, "OPTIONS": {}})


# -- several processes, each with its own connection, at each isolation level ------------

def _racer(level, names: list[str], contended: str, seconds: float, barrier, active,
           over, queue) -> None:
    report = {"pid": os.getpid(), "level": "", "first": [], "tokens": [], "grants": 0,
              "lock_errors": 0, "other": []}
    try:
        configure_default(level)
        report["level"] = isolation_in_effect("default")
        backend = new_backend()
        holder = Holder(task_id=f"p{os.getpid()}")
        # 1. First use of fresh names: all processes at once on each name.
        for name in names:
            barrier.wait(30)
            try:
                lease = backend.acquire(name, 1, holder, 30)
            except LockError:
                lease, report["lock_errors"] = None, report["lock_errors"] + 1
            except Exception as e:  # the defect: anything but LockError reaches the task
                lease = None
                report["other"].append(f"{type(e).__module__}.{type(e).__name__}: {e}"[:300])
            report["first"].append(lease.token if lease else None)
            barrier.wait(30)  # nobody releases before everyone tried
            if lease:
                backend.release(lease)
        # 2. A capacity-1 race on one name, counted outside the lock code.
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                lease = backend.acquire(contended, 1, holder, 30)
            except LockError:
                report["lock_errors"] += 1
                continue
            except Exception as e:
                report["other"].append(f"{type(e).__module__}.{type(e).__name__}: {e}"[:300])
                continue
            if lease is None:
                time.sleep(0.002)
                continue
            with active.get_lock():
                active.value += 1
                if active.value > 1:
                    over.value += 1
            report["tokens"].append(lease.token)
            report["grants"] += 1
            time.sleep(0.001)
            with active.get_lock():
                active.value -= 1
            backend.release(lease)
        backend.close()
    except BaseException:
        report["other"].append(traceback.format_exc()[-1500:])
    queue.put(report)


def race(level, names: int = 12, seconds: float = 4.0) -> dict:
    fresh = [f"first-{uuid.uuid4().hex[:10]}" for _ in range(names)]
    contended = f"race-{uuid.uuid4().hex[:10]}"
    context = multiprocessing.get_context("fork")
    barrier, queue = context.Barrier(PROCESSES), context.Queue()
    active, over = context.Value("i", 0), context.Value("i", 0)
    connections.close_all()  # no socket shared with the children
    children = [context.Process(target=_racer, args=(level, fresh, contended, seconds, barrier,
                                                     active, over, queue))
                for _ in range(PROCESSES)]
    for child in children:
        child.start()
    reports = [queue.get(timeout=180) for _ in children]
    for child in children:
        child.join(30)
    per_name = list(zip(*(report["first"] for report in reports), strict=True))
    return {
        "levels": sorted({report["level"] for report in reports}),
        "other": [text for report in reports for text in report["other"]],
        "lock_errors": sum(report["lock_errors"] for report in reports),
        "first_grants": [sum(token is not None for token in tokens) for tokens in per_name],
        "first_tokens": [token for tokens in per_name for token in tokens if token is not None],
        "grants": sum(report["grants"] for report in reports),
        "tokens": [token for report in reports for token in report["tokens"]],
        "over": over.value,
        "exitcodes": [child.exitcode for child in children],
    }


@pytest.mark.parametrize("level", isolation_levels(), ids=level_name)
def test_first_use_and_capacity_one_race_at_every_isolation_level(level):
    result = race(level)
    print(f"{level_name(level)}: {result['grants']} grants, {result['lock_errors']} LockError, "
          f"{result['over']} over-grants, first use {result['first_grants']}, other exceptions:",
          dict(Counter(text[:90] for text in result["other"])))

    assert result["levels"] == [level_name(level)]  # the project's setting was really in effect
    assert result["other"] == []  # nothing but LockError ever reaches a caller
    assert result["exitcodes"] == [0] * PROCESSES
    assert max(result["first_grants"]) == 1  # first use: exactly one grant per fresh name
    assert min(result["first_grants"]) == 1  # ...and a winner: nobody failed everybody
    assert result["over"] == 0
    assert result["grants"] > 0
    assert set(result["first_tokens"]) == {1}  # a busy attempt spends no token
    assert len(result["tokens"]) == len(set(result["tokens"]))
    # The own READ COMMITTED connection takes the conflicts off the table: no storm
    # of aborted transactions (was 1,074 errors for 536 grants at REPEATABLE READ).
    assert result["lock_errors"] <= result["grants"] // 20


def test_lock_statements_run_on_own_read_committed_connection():
    backend = new_backend()
    lease = backend.acquire(f"own-{uuid.uuid4().hex[:8]}", 1, Holder(task_id="t"), 30)
    alias = database_module.statement_alias("default")
    try:
        assert lease is not None
        assert alias != "default"
        assert connections[alias] is not connections["default"]
        assert isolation_in_effect(alias) == ("immediate" if VENDOR == "sqlite"
                                              else "read committed")
    finally:
        backend.release(lease)
        backend.close()


def test_connection_of_an_ended_thread_is_closed_when_the_next_opens():
    backend = new_backend()
    opened = []

    def use() -> None:
        backend.holders("threads")
        opened.append(connections[database_module.statement_alias("default")])

    for _ in range(2):
        thread = threading.Thread(target=use)
        thread.start()
        thread.join(30)
    first, second = opened
    assert first is not second  # one per thread
    assert first.connection is None  # its thread had ended: closed, not leaked
    assert second.connection is not None
    backend.close()
    assert second.connection is None  # close() reaches every thread's connection


def test_grant_and_release_commit_whatever_the_callers_transaction():
    """A lock taken inside ``transaction.atomic`` is visible to others at once and
    survives the caller's rollback (PostgreSQL, MariaDB/MySQL). SQLite is the
    documented exception: inside the caller's transaction the statements join it."""
    backend = new_backend()
    name = f"atomic-{uuid.uuid4().hex[:8]}"
    seen_by_other_thread: list[int] = []

    def other_thread() -> None:
        seen_by_other_thread.extend(lease.token for lease in backend.holders(name))
        connections.close_all()

    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), transaction.atomic():
        lease = backend.acquire(name, 1, Holder(task_id="t"), 30)
        assert lease is not None
        if VENDOR != "sqlite":
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join(30)
        raise Rollback
    try:
        if VENDOR == "sqlite":
            assert backend.holders(name) == []  # rolled back with the caller's transaction
        else:
            assert seen_by_other_thread == [lease.token]
            assert [held.token for held in backend.holders(name)] == [lease.token]
    finally:
        backend.release(lease)
        backend.close()


# -- the fence row --------------------------------------------------------------------

def test_fence_row_created_and_bumped_by_one_statement():
    backend = new_backend()
    name = f"fence-{uuid.uuid4().hex[:8]}"
    holder = Holder(task_id="t")
    first = backend.acquire(name, 1, holder, 30)
    assert first is not None and first.token == 1
    assert LockFence.objects.get(name=name).last_token == 1
    assert backend.acquire(name, 1, holder, 30) is None  # full: no token spent
    LockLease.objects.filter(name=name).delete()  # a lost lease row does not reset tokens
    second = backend.acquire(name, 1, holder, 30)
    assert second is not None and second.token == 2
    assert LockFence.objects.get(name=name).last_token == 2
    backend.release(second)
    backend.close()


def test_fence_statement_returns_server_time_in_utc():
    backend = new_backend()
    using = database_module.statement_alias("default")
    with transaction.atomic(using=using):
        token, now = database_module.next_token(using, f"clock-{uuid.uuid4().hex[:8]}")
    with connections[using].cursor() as cursor:
        sql = database_module.SERVER_NOW[VENDOR].replace("%%", "%")
        cursor.execute(f"SELECT {sql}")
        later = cursor.fetchone()[0]
    backend.close()
    assert token == 1
    assert now.utcoffset().total_seconds() == 0
    later = parse_datetime(later) if isinstance(later, str) else later
    assert abs((later.replace(tzinfo=None) - now.replace(tzinfo=None)).total_seconds()) < 5


# -- validity from the monotonic clock --------------------------------------------------

def test_validity_counts_from_before_the_request():
    backend = new_backend()
    name = f"valid-{uuid.uuid4().hex[:8]}"
    before = time.monotonic()
    lease = backend.acquire(name, 1, Holder(task_id="t"), 30)
    after = time.monotonic()
    assert lease is not None and lease.is_valid()
    assert before + 30 <= lease.valid_until <= after + 30
    expires_at = lease.expires_at
    time.sleep(0.2)
    before = time.monotonic()
    assert backend.renew(lease)
    after = time.monotonic()
    assert before + 30 <= lease.valid_until <= after + 30
    assert lease.expires_at > expires_at  # display value moved with the server's expiry
    stored = LockLease.objects.get(name=name).expires_at
    assert abs((stored - lease.expires_at).total_seconds()) < 1
    backend.release(lease)
    backend.close()


def test_sub_second_ttl_expires_by_the_servers_clock():
    """Expiry compares fractions of a second (datetime(6) on MariaDB/MySQL, ms on SQLite):
    a 0.5 s lease is listed at once and gone 1 s later, never rounded to whole seconds."""
    backend = new_backend()
    name = f"precise-{uuid.uuid4().hex[:8]}"
    holder = Holder(task_id="t")
    lease = backend.acquire(name, 1, holder, 0.5)
    assert lease is not None
    stored = LockLease.objects.get(name=name)
    assert abs((stored.expires_at - stored.acquired_at).total_seconds() - 0.5) < 0.002
    deadline = time.monotonic() + 5
    while backend.holders(name):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert time.monotonic() - (lease.valid_until - 0.5) >= 0.45  # not before its TTL
    again = backend.acquire(name, 1, holder, 30)
    assert again is not None and again.token == lease.token + 1
    backend.release(again)
    backend.close()


# -- aborted transactions -----------------------------------------------------------------

def aborted_error() -> DatabaseError:
    """A DatabaseError as Django raises it for a deadlock on each database."""
    if VENDOR == "postgresql":
        import psycopg

        cause: BaseException = psycopg.errors.DeadlockDetected("deadlock detected")
    else:
        cause = Exception(1213, "Deadlock found when trying to get lock")
    error = OperationalError(str(cause))
    error.__cause__ = cause
    return error


def test_aborted_transaction_is_run_again_then_reported_as_lock_error():
    backend = new_backend()
    calls = []

    def deadlocks(using):
        calls.append(using)
        raise aborted_error()

    with pytest.raises(LockError) as caught:
        backend._run("name", deadlocks)
    assert len(calls) == database_module.ATTEMPTS
    assert isinstance(caught.value.__cause__, OperationalError)

    outcomes = iter([aborted_error(), "granted"])

    def once(using):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert backend._run("name", once) == "granted"
    backend.close()


def test_other_database_errors_close_the_connection_and_become_lock_error():
    backend = new_backend()
    assert backend.holders("name") == []  # connected
    using = database_module.statement_alias("default")
    assert connections[using].connection is not None
    with mock.patch.object(LockLease.objects, "using", side_effect=OperationalError("gone")), \
            pytest.raises(LockError, match="OperationalError: gone"):
        backend.holders("name")
    assert connections[using].connection is None  # closed: the next call reconnects
    assert backend.holders("name") == []
    backend.close()


# -- system check W010 ------------------------------------------------------------------

@contextlib.contextmanager
def lock_backend_on(connection) -> Iterator[None]:
    """The 'default' lock backend pointed at ``connection``, registered for this thread."""
    alias = "w010-check"
    connections[alias] = connection
    backends = {"default": {"BACKEND": BACKEND, "OPTIONS": {"using": alias}}}
    try:
        with override_settings(CELERY_ADV={**settings.CELERY_ADV, "LOCK_BACKENDS": backends}):
            yield
    finally:
        del connections[alias]


def w010(**kwargs) -> list[str]:
    return [message.msg for message in check_database_lock_backend(**kwargs)
            if message.id == "django_celery_adv.W010"]


def test_check_is_silent_on_the_test_databases():
    assert w010(databases=["default"]) == []


def test_check_warns_about_unsupported_databases():
    with lock_backend_on(mock.Mock(vendor="oracle", settings_dict={})):
        assert w010() == ["The database lock backend 'default' runs on DATABASES['w010-check']: "
                          "oracle is not supported (no fence upsert, no server clock for expiry)."]
    memory = copy.deepcopy(connections["default"].settings_dict)
    memory.update(ENGINE="django.db.backends.sqlite3", NAME=":memory:", OPTIONS={})
    with lock_backend_on(load_backend(memory["ENGINE"]).DatabaseWrapper(memory, "w010-check")):
        [message] = w010()
        assert "in-memory SQLite database is private to one process" in message
    with override_settings(USE_TZ=False):
        [message] = w010()
        assert "USE_TZ is False" in message
    with lock_backend_on(mock.Mock(vendor="mysql", settings_dict={"TIME_ZONE": "Europe/Paris"})):
        [message] = w010()
        assert "TIME_ZONE 'Europe/Paris'" in message


if VENDOR == "mysql":  # storage engines are a MariaDB/MySQL matter

    def test_check_warns_about_lock_tables_without_innodb():
        table = connections["default"].ops.quote_name(LockFence._meta.db_table)
        with connections["default"].cursor() as cursor:
            cursor.execute(f"ALTER TABLE {table} ENGINE=MyISAM")
        try:
            [message] = w010(databases=["default"])
            assert "uses the MyISAM storage engine, not InnoDB" in message
            assert w010() == []  # queried only when the check may touch the database
        finally:
            with connections["default"].cursor() as cursor:
                cursor.execute(f"ALTER TABLE {table} ENGINE=InnoDB")


def test_own_connection_follows_a_change_of_the_aliases_settings():
    backend = new_backend()
    backend.holders("settings")
    alias = database_module.statement_alias("default")
    before = connections[alias]
    assert database_module.statement_alias("default") == alias
    assert connections[alias] is before  # unchanged settings: the same connection
    base = connections["default"].settings_dict
    name = base["NAME"]
    base["NAME"] = f"{name}-elsewhere"  # as another test database would
    try:
        database_module.statement_alias("default")
        assert connections[alias] is not before
        assert connections[alias].settings_dict["NAME"] == f"{name}-elsewhere"
        assert before.connection is None  # the replaced one was closed
    finally:
        base["NAME"] = name
    assert backend.holders("settings") == []  # back on the real database
    backend.close()
