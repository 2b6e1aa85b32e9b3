"""Database lock backend under faults: a client host's clock moved (faketime), the
server dropping the connection, a process forking while it holds a lease."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
import uuid

import pytest
from django.db import connections

from django_celery_adv.exceptions import LockError
from django_celery_adv.locks.backends import create_backend
from django_celery_adv.locks.backends import database as database_module
from django_celery_adv.locks.backends.base import Holder
from django_celery_adv.models import LockLease
from tests.faults.clock import run_with_clock

pytestmark = pytest.mark.db

BACKEND = "django_celery_adv.locks.backends.database.DatabaseBackend"
VENDOR = connections["default"].vendor
#: SQLite has no server: "now" is the clock of the process running the statement.
SERVER_CLOCK = VENDOR != "sqlite"


def new_backend():
    return create_backend("default", {"BACKEND": BACKEND, "OPTIONS": {}})


ACQUIRE_ON_SIGNAL = """
import json, pathlib, time
from django_celery_adv.locks.backends import create_backend
from django_celery_adv.locks.backends.base import Holder
from django_celery_adv.models import LockLease
backend = create_backend("default", {{"BACKEND": {backend!r}, "OPTIONS": {{}}}})
backend.holders("warm-up")  # connected before the signal: the acquire is quick
pathlib.Path({ready!r}).touch()
while not pathlib.Path({go!r}).exists():
    time.sleep(0.02)
lease = backend.acquire({name!r}, 1, Holder(task_id="skewed"), {ttl})
print(json.dumps({{"token": lease and lease.token}}))
if lease:
    backend.release(lease)
backend.close()
"""


class SkewedAcquirer:
    """A process whose clock is moved by ``offset``, set up in advance and told
    when to acquire, so the moment it reads the lease does not depend on how
    long a Python process takes to start on a loaded machine."""

    def __init__(self, offset: str, name: str, ttl: float, directory) -> None:
        self.ready, self.go = directory / "ready", directory / "go"
        code = ACQUIRE_ON_SIGNAL.format(backend=BACKEND, name=name, ttl=ttl,
                                        ready=str(self.ready), go=str(self.go))
        self.result: dict = {}
        connections.close_all()
        self.thread = threading.Thread(
            target=lambda: self.result.update(run_with_clock(offset, code)))
        self.thread.start()
        deadline = time.monotonic() + 90
        while not self.ready.exists():
            assert self.thread.is_alive() and time.monotonic() < deadline, "did not start"
            time.sleep(0.05)

    def acquire(self) -> int | None:
        """Token granted to the skewed process (None: busy)."""
        self.go.touch()
        self.thread.join(60)
        return self.result["token"]


def lease_rows(name: str) -> list[int]:
    return list(LockLease.objects.filter(name=name).values_list("token", flat=True))


def held_then_skewed(offset: str, *, ttl: float, age: float, directory):
    """This process takes a lock with ``ttl`` and lets it age ``age`` seconds; then a
    process with its clock moved by ``offset`` tries it. Returns (backend, name,
    the lease, the token the skewed process was granted or None)."""
    backend = new_backend()
    name = f"skewed-{uuid.uuid4().hex[:8]}"
    skewed = SkewedAcquirer(offset, name, 10, directory)
    lease = backend.acquire(name, 1, Holder(task_id="holder"), ttl)
    assert lease is not None
    time.sleep(age)
    return backend, name, lease, skewed.acquire()


def test_host_ahead_is_not_granted_a_held_lock(tmp_path):
    """Held with TTL 10, 5.5 s old: a host 5 s ahead would read it as expired."""
    backend, name, lease, token = held_then_skewed("+5s", ttl=10, age=5.5, directory=tmp_path)
    print(f"host +5s on a lease with ~4.5 s left: granted token {token}")
    try:
        if SERVER_CLOCK:
            assert token is None  # the server's clock says held
            assert lease_rows(name) == [lease.token]  # and the holder's row is untouched
        else:
            # SQLite: the faked process's clock IS the database's clock (one host,
            # one clock in real life): it reads the lease as expired and takes it.
            assert token == lease.token + 1
    finally:
        backend.release(lease)
        backend.close()


def test_host_behind_is_granted_an_expired_lock(tmp_path):
    """Held with TTL 2, 3 s old: expired; a host 5 s behind would read it as live."""
    backend, _, lease, token = held_then_skewed("-5s", ttl=2, age=3, directory=tmp_path)
    assert not lease.is_valid()  # the holder's own monotonic view agrees
    print(f"host -5s on a lease expired 1 s ago: granted token {token}")
    try:
        if SERVER_CLOCK:
            assert token == lease.token + 1
        else:
            assert token is None  # SQLite: that process's clock is the database's
        assert not backend.renew(lease)  # expired by the database's clock either way
    finally:
        backend.close()


# -- the server drops the connection ---------------------------------------------------

def server_session(alias: str) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()" if VENDOR == "postgresql"
                       else "SELECT CONNECTION_ID()")
        return int(cursor.fetchone()[0])


def kill_session(session: int) -> None:
    with connections["default"].cursor() as cursor:
        if VENDOR == "postgresql":
            cursor.execute("SELECT pg_terminate_backend(%s)", [session])
        else:
            cursor.execute(f"KILL {int(session)}")


if SERVER_CLOCK:  # SQLite has no server session to drop

    def test_dropped_connection_is_one_lock_error_then_reconnects():
        backend = new_backend()
        name = f"dropped-{uuid.uuid4().hex[:8]}"
        lease = backend.acquire(name, 1, Holder(task_id="t"), 30)
        alias = database_module.statement_alias("default")
        before = server_session(alias)
        kill_session(before)
        time.sleep(0.5)
        try:
            with pytest.raises(LockError):
                backend.renew(lease)
            assert backend.renew(lease)  # a new connection, same lease
            assert server_session(alias) != before
        finally:
            backend.release(lease)
            backend.close()


# -- fork -----------------------------------------------------------------------------------

def _child(name: str, queue) -> None:
    backend = new_backend()
    started = time.monotonic()
    lease = backend.acquire(name, 1, Holder(task_id="child"), 30)
    report = {"token": lease and lease.token, "seconds": time.monotonic() - started}
    if SERVER_CLOCK:
        report["session"] = server_session(database_module.statement_alias("default"))
    backend.release(lease)
    queue.put(json.dumps(report))
    # The child exits without closing anything: the parent's inherited connection
    # must not be closed (or its session ended) on the way out.


def test_forked_child_uses_its_own_connection_and_leaves_the_parents_alone():
    backend = new_backend()
    held = backend.acquire(f"parent-{uuid.uuid4().hex[:8]}", 1, Holder(task_id="p"), 30)
    alias = database_module.statement_alias("default")
    parent_connection = connections[alias].connection
    session = server_session(alias) if SERVER_CLOCK else None
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(f"child-{uuid.uuid4().hex[:8]}", queue))
    child.start()
    report = json.loads(queue.get(timeout=30))
    child.join(30)
    try:
        assert child.exitcode == 0
        assert report["token"] == 1 and report["seconds"] < 1
        if SERVER_CLOCK:
            assert report["session"] != session
            assert server_session(alias) == session  # the parent's session lived on
        assert connections[alias].connection is parent_connection
        assert backend.renew(held)
        assert os.getpid() == held.owner_pid
    finally:
        backend.release(held)
        backend.close()
