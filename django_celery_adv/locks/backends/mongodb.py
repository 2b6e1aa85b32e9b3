"""Lock backend on MongoDB: one document per (name, slot) under a unique index.

Documents of the leases collection (``OPTIONS["collection"]``, default
``locks``) are ``{name, slot, token, task_id, hostname, pid, acquired_at,
expires_at, ttl}``; a unique index on ``(name, slot)`` lets the server, not
this code, decide who wins a slot. The fencing counters live in
``<collection>.fences``, one ``{_id: name, last_token}`` document per lock
name, bumped with ``find_one_and_update`` (``$inc``, upsert).

Acquire, without transactions:

1. read the name's leases; delete those expired (``expires_at <= now``), so
   expired leases are reclaimed inside acquire and MongoDB's TTL monitor is
   never relied upon; if ``capacity`` leases are live (counting every slot,
   also those above a capacity that was lowered), return None;
2. insert a lease document into the lowest free slot below ``capacity``
   with token 0 ("being granted"); ``DuplicateKeyError`` means someone else
   got there first, so try the next free slot;
3. count the live leases again. Steps 1 and 2 are not one atomic step, so
   two acquirers may slip in together while slots above a lowered capacity
   are held; whoever then counts more live leases than ``capacity`` deletes
   its document and returns None. The last acquirer to count sees every
   other lease, so no moment has more holders than capacity;
4. take the token (``$inc``) and write it into the document, if that is
   still there and live. The token is taken only once the slot is ours, so
   the grants of a slot get strictly increasing tokens even if an acquirer
   stalls for longer than a TTL.

Release and force_release delete the one document of that exact lease;
renew updates it only while it is live. A TTL index on ``expires_at``
(one hour after expiry) only collects documents of abandoned locks; the
fence documents are never deleted, so tokens never go backwards.

Time is the application servers' UTC clock (``datetime.now(UTC)``, stored at
BSON's millisecond precision): hosts that share a lock must keep their
clocks in sync (NTP) to within a small part of the TTL. Use ``w=majority``
in the URL on a replica set, or a failover may forget a grant.

What the tests prove: on real MongoDB (``MONGODB_URL`` set) everything
above. Without a server they run on mongomock, which proves the queries and
updates, the unique index (``DuplicateKeyError`` from pymongo's own class),
``$lte``/``$gt`` on timezone-aware datetimes and the millisecond truncation.
It does not prove atomicity: mongomock's ``$inc`` is a read-modify-write in
Python, ``find_one_and_update`` re-applies its update by ``_id`` after an
unlocked find, and two deletes of one document race into a ``KeyError``.
This design needs no conditional update to win a slot (only the unique
insert, which mongomock does keep to one winner), but the thread tests
still serialize each mongomock call to stand in for the server's
single-document atomicity. Nor does mongomock prove write concerns, the
TTL monitor, or index builds on a populated collection.

Error handling
==============

Every ``pymongo.errors.PyMongoError`` other than the duplicate key of a
contested slot (server selection timeout, connection refused, auth, an
index conflict) is raised as
:class:`~django_celery_adv.exceptions.LockError` chained with ``from``. An
acquire that raised after inserting its document may leave that slot held
until the lease's TTL expires, never longer. Retryable writes (pymongo's
default on replica sets) are executed at most once by the server, so the
client's own retry cannot grant two slots.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from pymongo import ASCENDING, MongoClient, ReturnDocument
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError, PyMongoError

from ...exceptions import InvalidLockBackendError, LockError
from ...masking import mask_url
from .base import Holder, Lease, LockBackend, utcnow

DEFAULT_DATABASE = "celery_adv"
DEFAULT_COLLECTION = "locks"
#: Milliseconds the client waits for a server (unless the URL says otherwise):
#: pymongo's 30 s default would turn a non-blocking acquire into a long stall.
DEFAULT_TIMEOUT_MS = 5000
#: Seconds after expiry before the TTL monitor may collect a lease document.
#: Long enough that acquire's own reclaim, not the monitor, is what runs.
GC_AFTER_SECONDS = 3600
#: Token of a document whose acquirer has not yet taken its token.
GRANTING = 0

T = TypeVar("T")




def _now() -> datetime:
    # BSON dates hold milliseconds; truncating first makes a Lease equal to
    # what holders() reads back.
    now = utcnow()
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _after(start: datetime, seconds: float) -> datetime:
    # At least 1 ms: a zero TTL would grant a lease that is expired at birth.
    return start + timedelta(milliseconds=max(1, round(float(seconds) * 1000)))


def _aware(value: datetime) -> datetime:
    # pymongo returns naive UTC datetimes from a client made without
    # tz_aware=True (one handed in by a test's patch, say).
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class _Connection:
    """A client and its collections, valid only in the process that created them."""

    pid: int
    client: MongoClient[dict[str, Any]]
    leases: Collection[dict[str, Any]]
    fences: Collection[dict[str, Any]]


class MongoDBBackend(LockBackend):
    """Leases are documents, one per (name, slot); tokens come from a fence document.

    OPTIONS: ``url`` (required, ``mongodb://`` or ``mongodb+srv://``; client
    options such as ``serverSelectionTimeoutMS`` or ``w`` go in its query),
    ``database`` (default ``"celery_adv"``), ``collection`` (default ``"locks"``).
    """

    required_options = ("url",)

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        if not self.options.get("url"):
            raise InvalidLockBackendError(f"mongodb lock backend {alias!r} needs OPTIONS['url'].")
        self.url = str(self.options["url"])
        self.database = str(self.options.get("database") or DEFAULT_DATABASE)
        self.collection = str(self.options.get("collection") or DEFAULT_COLLECTION)
        self._conn: _Connection | None = None
        self._guard = threading.Lock()
        self._guard_pid = os.getpid()

    # -- the five operations ------------------------------------------------

    def acquire(self, name: str, capacity: int, holder: Holder, ttl: float) -> Lease | None:
        if capacity <= 0:
            return None
        return self._run(lambda conn: self._acquire(conn, name, capacity, holder, ttl))

    def _acquire(self, conn: _Connection, name: str, capacity: int, holder: Holder,
                 ttl: float) -> Lease | None:
        now = _now()
        docs = list(conn.leases.find({"name": name}, {"slot": 1, "expires_at": 1, "_id": 0}))
        if any(_aware(doc["expires_at"]) <= now for doc in docs):
            conn.leases.delete_many({"name": name, "expires_at": {"$lte": now}})
        live = {doc["slot"] for doc in docs if _aware(doc["expires_at"]) > now}
        if len(live) >= capacity:
            return None
        expires_at = _after(now, ttl)
        for slot in sorted(set(range(capacity)) - live):
            try:
                doc_id = conn.leases.insert_one({
                    "name": name, "slot": slot, "token": GRANTING, **holder.as_dict(),
                    "acquired_at": now, "expires_at": expires_at, "ttl": float(ttl),
                }).inserted_id
            except DuplicateKeyError:
                continue  # taken since we looked: the server picked one winner
            # Judged with the earlier ``now`` so that anything live then is counted.
            if conn.leases.count_documents(
                    {"name": name, "expires_at": {"$gt": now}}) > capacity:
                conn.leases.delete_one({"_id": doc_id})
                return None
            token = self._next_token(conn, name)
            # Our document may have expired and been reclaimed while we stalled.
            if not conn.leases.update_one(
                    {"_id": doc_id, "expires_at": {"$gt": _now()}},
                    {"$set": {"token": token}}).matched_count:
                return None
            return Lease(name=name, slot=slot, token=token, holder=holder,
                         acquired_at=now, expires_at=expires_at, ttl=ttl,
                         backend=self.alias)
        return None

    def _next_token(self, conn: _Connection, name: str) -> int:
        update = {"$inc": {"last_token": 1}}
        try:
            doc = conn.fences.find_one_and_update(
                {"_id": name}, update, upsert=True, return_document=ReturnDocument.AFTER)
        except DuplicateKeyError:
            # Two first-ever upserts raced (servers before 4.2 do not retry
            # this themselves); the document exists now.
            doc = conn.fences.find_one_and_update(
                {"_id": name}, update, return_document=ReturnDocument.AFTER)
        return int(doc["last_token"])

    def renew(self, lease: Lease) -> bool:
        def renew(conn: _Connection) -> bool:
            now = _now()
            expires_at = _after(now, lease.ttl)
            result = conn.leases.update_one(
                {"name": lease.name, "slot": lease.slot, "token": lease.token,
                 "expires_at": {"$gt": now}},
                {"$set": {"expires_at": expires_at, "ttl": float(lease.ttl)}})
            if result.matched_count:
                lease.expires_at = expires_at
            return bool(result.matched_count)

        return self._run(renew)

    def release(self, lease: Lease) -> None:
        self._run(lambda conn: conn.leases.delete_one(
            {"name": lease.name, "slot": lease.slot, "token": lease.token}))

    def holders(self, name: str) -> list[Lease]:
        docs = self._run(lambda conn: list(conn.leases.find(
            {"name": name, "token": {"$gt": GRANTING}, "expires_at": {"$gt": _now()}},
            sort=[("slot", ASCENDING)])))
        return [self._lease(doc) for doc in docs]

    def force_release(self, name: str, token: int) -> bool:
        if int(token) <= GRANTING:
            return False  # would match a document still being granted
        return self._run(lambda conn: bool(conn.leases.delete_one(
            {"name": name, "token": int(token), "expires_at": {"$gt": _now()}}).deleted_count))

    def close(self) -> None:
        with self._lock():
            conn, self._conn = self._conn, None
        # Another process's connections are not ours to shut down.
        if conn is not None and conn.pid == os.getpid():
            conn.client.close()

    def describe(self) -> str:
        return f"mongodb {mask_url(self.url)} {self.database}.{self.collection}"

    # -- helpers ---------------------------------------------------------------

    def _lock(self) -> threading.Lock:
        # A lock inherited through fork may be held by a thread that does not
        # exist in the child; the child starts with a fresh one.
        if self._guard_pid != os.getpid():
            self._guard = threading.Lock()
            self._guard_pid = os.getpid()
        return self._guard

    def _connection(self) -> _Connection:
        conn = self._conn
        pid = os.getpid()
        if conn is not None and conn.pid == pid:
            return conn
        with self._lock():
            conn = self._conn
            if conn is not None and conn.pid == pid:
                return conn
            # A client inherited through fork is dropped unclosed: pymongo
            # clients are not fork-safe, and the parent still uses its sockets.
            client: MongoClient[dict[str, Any]] = MongoClient(
                self.url, tz_aware=True, **self._timeouts())
            database = client[self.database]
            leases = database[self.collection]
            try:
                leases.create_index([("name", ASCENDING), ("slot", ASCENDING)], unique=True)
                leases.create_index([("name", ASCENDING), ("token", ASCENDING)])
                leases.create_index([("expires_at", ASCENDING)],
                                    expireAfterSeconds=GC_AFTER_SECONDS)
            except PyMongoError:
                client.close()  # else every failed attempt leaves monitor threads behind
                raise
            conn = _Connection(pid=pid, client=client, leases=leases,
                               fences=database[f"{self.collection}.fences"])
            self._conn = conn
            return conn

    def _timeouts(self) -> dict[str, int]:
        given = {key.lower() for key, _ in parse_qsl(urlsplit(self.url).query)}
        return {key: DEFAULT_TIMEOUT_MS
                for key in ("serverSelectionTimeoutMS", "connectTimeoutMS", "socketTimeoutMS")
                if key.lower() not in given}

    def _run(self, operation: Callable[[_Connection], T]) -> T:
        try:
            return operation(self._connection())
        except PyMongoError as e:
            raise LockError(f"mongodb lock backend {self.alias!r} "
                            f"({mask_url(self.url)}): {e}") from e

    def _lease(self, doc: Mapping[str, Any]) -> Lease:
        return Lease(
            name=doc["name"], slot=int(doc["slot"]), token=int(doc["token"]),
            holder=Holder.from_dict(doc),
            acquired_at=_aware(doc["acquired_at"]), expires_at=_aware(doc["expires_at"]),
            ttl=float(doc["ttl"]), backend=self.alias,
        )
