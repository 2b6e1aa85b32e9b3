"""Lock backend on the Django database: the embedded default (PostgreSQL, MariaDB/MySQL, SQLite).

Leases are rows of ``LockLease`` (unique per ``(name, slot)``); fencing tokens
come from ``LockFence``, one row per lock name.

Acquire is one transaction: a single upsert statement bumps (or creates) the
name's fence row and returns the new token together with the database
server's current time; the row lock it takes serializes the acquirers of one
name until commit. Then that name's expired leases are deleted and a lease is
inserted into the lowest free slot. A full lock rolls back (no token is spent).
The unique ``(name, slot)`` constraint means that even a broken serialization
cannot hand one slot out twice.

Connections: the lock statements run on the backend's own connection to the
``using`` database, one per thread, opened from that alias's settings with
the isolation level forced to READ COMMITTED (PostgreSQL, MariaDB/MySQL) and
``BEGIN IMMEDIATE`` on SQLite. So whatever isolation level the project runs at
(REPEATABLE READ, SERIALIZABLE), the first use of a name by several processes
just queues on the fence row, and a grant or release commits at once, whatever
transaction the caller is in (a rollback of the caller's transaction does not
undo it). A forked child opens its own (the parent's are left untouched, never
closed from the child); the connection of a thread that ended is closed when
the next one is opened; ``close()`` closes them all.
Exceptions, where the caller's connection is used instead: an in-memory SQLite
database (another connection would be another database) and SQLite while the
calling thread is inside ``transaction.atomic`` on it (SQLite has one writer:
a second connection would wait for the caller's own transaction).

Time: who holds a slot is decided by the database server's clock only
(PostgreSQL ``STATEMENT_TIMESTAMP()``, MariaDB/MySQL ``UTC_TIMESTAMP(6)``,
SQLite ``strftime('%Y-%m-%d %H:%M:%f', 'now')``): the grant stores
``expires_at`` = server now + TTL, and expired leases are those whose
``expires_at`` is not after the server's now. A client host whose clock is off
can neither take a held slot nor keep one past its TTL. SQLite has no server:
its "now" is the clock of the process running the statement, which is the
same host for every process sharing the file (one host, one clock).
:meth:`Lease.is_valid` counts from ``time.monotonic()`` read before the
request was sent (see :mod:`.base`).

Guarantees per database (``USE_TZ = True`` required; system check W010):

* PostgreSQL (any isolation level configured for the alias): no over-grant,
  unique tokens, no serialization failure in normal operation.
* MariaDB/MySQL, InnoDB (REPEATABLE READ or READ COMMITTED configured): the
  same. The own connection runs at READ COMMITTED, so InnoDB takes no gap
  locks for the range reads and deletes; ``SELECT ... FOR UPDATE SKIP LOCKED``
  is not used anywhere (the fence row lock does the serializing on every
  database alike). Fence upsert: ``INSERT ... ON DUPLICATE KEY UPDATE
  last_token = LAST_INSERT_ID(last_token + 1)`` then ``SELECT
  LAST_INSERT_ID()`` on the same connection. Datetimes are ``datetime(6)``:
  expiry compares microseconds. The ``using`` database's ``TIME_ZONE`` must be
  UTC (Django's default), as ``UTC_TIMESTAMP`` is compared with stored values.
* SQLite >= 3.35 (``INSERT ... ON CONFLICT ... RETURNING``): always
  serializable; acquirers queue on the database's write lock (``BEGIN
  IMMEDIATE``, busy timeout 20 s unless the alias sets ``timeout``). Use WAL
  (``"init_command": "PRAGMA journal_mode=WAL;"``) so the read-only "is it
  full?" checks of waiting acquirers never hold up a releasing writer.

Waits on the server are bounded by ``IO_TIMEOUT`` (10 s) where the driver can
bound them; the own connection gets these options unless the alias's OPTIONS
set them. MariaDB/MySQL (PyMySQL, mysqlclient): ``connect_timeout``,
``read_timeout``, ``write_timeout``: a server that stops answering fails the
statement. PostgreSQL (libpq): ``connect_timeout``, ``tcp_user_timeout`` and
keepalives: a link that stops acknowledging (a partition, a dead host) fails
the statement, but libpq has no read timeout, so a server whose kernel still
acknowledges while the server never answers (a paused process) keeps the
statement waiting. The heartbeat renews each backend's leases on a thread of
its own, so such a wait never starves leases held on other backends.

On SQLite inside the caller's ``transaction.atomic`` the grant is part of the
caller's transaction: if the caller rolls back, the fence bump is undone too
and a later grant can carry the same token again. Do not rely on fencing
tokens from grants made inside a transaction that may roll back on SQLite.

Error handling: ``DatabaseError`` (``client_errors``) becomes ``LockError``
through ``translate_errors``, which callers treat as retryable. A transaction
the database aborted to break a conflict (PostgreSQL serialization failure or
deadlock, MariaDB/MySQL deadlock) is run again, up to three times, before it
is reported; after any other error the connection is closed, so the next call
reconnects (a restarted server is picked up). An ``IntegrityError`` on the
lease insert means another acquirer won the slot: busy (None), not an error.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from django.db import DatabaseError, IntegrityError, connections, router, transaction
from django.db.models import DateTimeField, Func
from django.db.utils import ConnectionDoesNotExist
from django.utils.dateparse import parse_datetime

from ...dbretry import ATTEMPTS, aborted_by_database
from ...models import LockFence, LockLease
from ...process import after_fork
from .base import Holder, Lease, LockBackend

T = TypeVar("T")

#: The server's current time, in the form Django stores datetimes (UTC).
SERVER_NOW = {
    "postgresql": "STATEMENT_TIMESTAMP()",
    "mysql": "UTC_TIMESTAMP(6)",
    "sqlite": "STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW')",
}
#: Suffix of the connection aliases this module registers per thread.
OWN_SUFFIX = "__dca_locks"


class ServerNow(Func):
    """The database server's clock as an ORM expression (UTC, as stored)."""

    output_field = DateTimeField()

    def as_sql(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list]:
        return SERVER_NOW[connection.vendor], []


class DatabaseBackend(LockBackend):
    """Leases are rows of ``LockLease``; tokens come from ``LockFence``.

    OPTIONS: ``using`` (database alias, default: the router's choice).
    """

    client_errors = (DatabaseError,)

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        self.using = options.get("using") or router.db_for_write(LockLease)

    def acquire(self, name: str, capacity: int, holder: Holder, ttl: float) -> Lease | None:
        if capacity <= 0:
            return None

        def attempt(using: str) -> Lease | None:
            sent_at = time.monotonic()
            leases = LockLease.objects.using(using)
            # A plain read first: a full lock is answered without taking the
            # write lock that the holders need to release (SQLite locks the file).
            if leases.filter(name=name, expires_at__gt=ServerNow()).count() >= capacity:
                return None
            try:
                with transaction.atomic(using=using):
                    token, now = next_token(using, name)
                    leases.filter(name=name, expires_at__lte=now).delete()
                    taken = set(leases.filter(name=name).values_list("slot", flat=True))
                    if len(taken) >= capacity:
                        transaction.set_rollback(True, using=using)
                        return None
                    row = leases.create(
                        name=name, slot=min(set(range(capacity)) - taken), token=token,
                        task_id=holder.task_id or "", hostname=holder.hostname,
                        pid=holder.pid, acquired_at=now, expires_at=now + timedelta(seconds=ttl))
            except IntegrityError:
                return None  # another acquirer took the slot first: busy, not broken
            lease = self._lease(row, ttl)
            lease.confirm(sent_at, ttl)
            return lease

        return self._run(name, attempt)

    def release(self, lease: Lease) -> None:
        self._run(lease.name, lambda using: LockLease.objects.using(using).filter(
            name=lease.name, slot=lease.slot, token=lease.token).delete())

    def renew(self, lease: Lease) -> bool:
        sent_at = time.monotonic()
        updated = self._run(lease.name, lambda using: LockLease.objects.using(using).filter(
            name=lease.name, slot=lease.slot, token=lease.token, expires_at__gt=ServerNow(),
        ).update(expires_at=ServerNow() + timedelta(seconds=lease.ttl)))
        if not updated:
            return False
        if lease.valid_until:  # display only: the server's expiry moved as far as our clock
            lease.expires_at += timedelta(seconds=sent_at - (lease.valid_until - lease.ttl))
        lease.confirm(sent_at, lease.ttl)
        return True

    def holders(self, name: str) -> list[Lease]:
        rows = self._run(name, lambda using: list(LockLease.objects.using(using).filter(
            name=name, expires_at__gt=ServerNow()).order_by("slot")))
        return [self._lease(row) for row in rows]

    def force_release(self, name: str, token: int) -> bool:
        """True only if ``token`` was live; an expired row goes too, as a cleanup."""
        def delete(using: str) -> bool:
            rows = LockLease.objects.using(using).filter(name=name, token=token)
            live, _ = rows.filter(expires_at__gt=ServerNow()).delete()
            if not live:
                rows.delete()
            return bool(live)

        return self._run(name, delete)

    def describe(self) -> str:
        return f"database {self.using!r}"

    def close(self) -> None:
        close_own_connections(self.using)

    def _run(self, name: str, operation: Callable[[str], T]) -> T:
        """``operation(alias)`` on this thread's lock connection; a transaction
        the database aborted is run again, anything else becomes LockError."""
        using = statement_alias(self.using)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return operation(using)
            except DatabaseError as e:
                if attempt < ATTEMPTS and aborted_by_database(e):
                    continue
                if using != self.using:
                    connections[using].close()  # reconnect next time (server restarted?)
                with self.translate_errors(name):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _lease(self, row: LockLease, ttl: float | None = None) -> Lease:
        if ttl is None:
            ttl = (row.expires_at - row.acquired_at).total_seconds()
        return Lease(
            name=row.name, slot=row.slot, token=row.token,
            holder=Holder(task_id=row.task_id or None, hostname=row.hostname, pid=row.pid),
            acquired_at=row.acquired_at, expires_at=row.expires_at, ttl=ttl,
            backend=self.alias,
        )


def next_token(using: str, name: str) -> tuple[int, datetime]:
    """Bump (or create) the fence row of ``name`` in one statement; returns the
    new token and the server's clock. Must run inside the acquire transaction."""
    connection = connections[using]
    quote = connection.ops.quote_name
    table, column = quote(LockFence._meta.db_table), quote("last_token")
    with connection.cursor() as cursor:
        if connection.vendor == "mysql":
            # LAST_INSERT_ID(expr) is per connection: the value this statement set.
            cursor.execute(
                f"INSERT INTO {table} ({quote('name')}, {column}) VALUES (%s, LAST_INSERT_ID(1))"
                f" ON DUPLICATE KEY UPDATE {column} = LAST_INSERT_ID({column} + 1)", [name])
            cursor.execute(f"SELECT LAST_INSERT_ID(), {SERVER_NOW['mysql']}")
        else:
            cursor.execute(
                f"INSERT INTO {table} ({quote('name')}, {column}) VALUES (%s, 1)"
                f" ON CONFLICT ({quote('name')}) DO UPDATE SET {column} = {table}.{column} + 1"
                f" RETURNING {column}, {SERVER_NOW[connection.vendor]}", [name])
        token, now = cursor.fetchone()
    if isinstance(now, str):  # SQLite
        now = parse_datetime(now)
    if now.tzinfo is None:  # SQLite, MariaDB/MySQL: UTC without a zone
        now = now.replace(tzinfo=UTC)
    return int(token), now


# -- the backend's own connections (see "Connections" above) --------------------

#: (thread, alias, connection) for every own connection this process opened.
_opened: list[tuple[threading.Thread, str, Any]] = []
_opened_guard = threading.Lock()
#: A forked child's copies of its parent's connections: kept referenced and
#: never closed here, since their sockets are the parent's.
_inherited: list[Any] = []


def statement_alias(using: str) -> str:
    """The connection alias the lock statements of this thread run on."""
    base = connections[using]
    if base.vendor == "sqlite" and (base.is_in_memory_db() or base.in_atomic_block):
        return using
    alias = using + OWN_SUFFIX
    try:
        own = connections[alias]
    except ConnectionDoesNotExist:
        own = None
    # Reopened when the alias's settings changed (override_settings, another test database).
    if own is None or own.dca_source != _source(base.settings_dict):
        connections[alias] = open_own_connection(using, alias)
    return alias


def _source(params: Mapping[str, Any]) -> tuple:
    return tuple(str(params.get(key)) for key in ("ENGINE", "NAME", "HOST", "PORT", "USER"))


#: Seconds a lock statement's connection waits for a server that does not
#: answer (cut off, hung) before the statement fails with ``LockError``; the
#: alias's own driver OPTIONS of the same name win.
IO_TIMEOUT = 10


def _io_timeouts(vendor: str) -> dict[str, Any]:
    """Driver options that bound every wait on the server (connect, send, read)."""
    if vendor == "postgresql":  # libpq: keepalives notice a silent peer, the rest bound waits
        return {"connect_timeout": IO_TIMEOUT, "tcp_user_timeout": IO_TIMEOUT * 1000,
                "keepalives": 1, "keepalives_idle": max(1, IO_TIMEOUT // 3),
                "keepalives_interval": 1, "keepalives_count": 3}
    if vendor == "mysql":  # PyMySQL and mysqlclient
        return {"connect_timeout": IO_TIMEOUT, "read_timeout": IO_TIMEOUT,
                "write_timeout": IO_TIMEOUT}
    return {}


def open_own_connection(using: str, alias: str) -> Any:
    base = connections[using]
    params = copy.deepcopy(base.settings_dict)
    options = params["OPTIONS"]
    options.pop("pool", None)  # one persistent connection per thread instead
    for key, value in _io_timeouts(base.vendor).items():
        options.setdefault(key, value)
    if base.vendor == "postgresql":
        from django.db.backends.postgresql.psycopg_any import IsolationLevel

        options["isolation_level"] = IsolationLevel.READ_COMMITTED
    elif base.vendor == "mysql":
        options["isolation_level"] = "read committed"
    elif base.vendor == "sqlite":
        options["transaction_mode"] = "IMMEDIATE"
        options.setdefault("timeout", 20)
    connection = type(base)(params, alias)
    connection.dca_source = _source(base.settings_dict)
    connection.inc_thread_sharing()  # close() may come from another thread
    current = threading.current_thread()
    with _opened_guard:
        for entry in [entry for entry in _opened
                      if not entry[0].is_alive() or entry[:2] == (current, alias)]:
            _opened.remove(entry)
            entry[2].close()  # its thread ended, or this thread's replaced one
        _opened.append((current, alias, connection))
    return connection


def close_own_connections(using: str | None = None) -> None:
    """Close this process's own connections to ``using`` (None: to every database);
    they reopen on use. Test suites call it before the test databases are dropped."""
    with _opened_guard:
        mine = [connection for _, alias, connection in _opened
                if using is None or alias == using + OWN_SUFFIX]
    for connection in mine:
        connection.close()


@after_fork
def _forget_parent_connections() -> None:
    global _opened_guard
    _opened_guard = threading.Lock()  # a parent thread may have held it at the fork
    _inherited.extend(connection for _, _, connection in _opened)
    aliases = {alias for _, alias, _ in _opened}
    _opened.clear()
    for alias in aliases:
        with contextlib.suppress(AttributeError):
            del connections[alias]  # this (the forking) thread's registration
