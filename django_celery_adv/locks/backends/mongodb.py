"""Lock backend on MongoDB: one document per (name, slot) under a unique index.

Documents of the leases collection (``OPTIONS["collection"]``, default
``locks``) are ``{name, slot, token, task_id, hostname, pid, acquired_at,
expires_at, ttl}``; a unique index on ``(name, slot)`` lets the server, not
this code, decide who wins a slot. The fencing counters live in
``<collection>.fences``, one ``{_id: name, last_token}`` document per lock
name, bumped with ``find_one_and_update`` (``$inc``, upsert).

Acquire, without transactions:

1. read the server's time ``now`` (below); read the name's leases; delete
   those expired (``expires_at <= now``), so expired leases are reclaimed
   inside acquire and MongoDB's TTL monitor is never relied upon; if
   ``capacity`` leases are live (counting every slot, also those above a
   capacity that was lowered), return None;
2. insert a lease document into the lowest free slot below ``capacity``
   with token 0 ("being granted"); ``DuplicateKeyError`` means someone else
   got there first, so try the next free slot;
3. count the live leases again. Steps 1 and 2 are not one atomic step, so
   two acquirers may slip in together while slots above a lowered capacity
   are held; whoever then counts more live leases than ``capacity`` deletes
   its document and returns None. The last acquirer to count sees every
   other lease, so no moment has more holders than capacity;
4. take the token (``$inc``) and write it into the document, if that is
   still there and this process still counts on it (below). The token is
   taken only once the slot is ours, so the grants of a slot get strictly
   increasing tokens even if an acquirer stalls for longer than a TTL; one
   that did stall deletes its document and returns None.

Release and force_release delete the one document of that exact lease;
renew updates it only while it is live. A TTL index on ``expires_at``
(one hour after expiry) only collects documents of abandoned locks; the
fence documents are never deleted, so tokens never go backwards.

Clocks
======

On a real mongod (or mongos) the server's clock decides: each operation
first reads the server's time (``localTime`` of the ``hello`` command, one
round trip) and every ``expires_at`` is written and compared in that time,
so hosts need no clock sync for safety and a host whose clock is minutes
off is neither granted a held slot nor keeps one. (``$$NOW`` in an update
pipeline would spare that round trip, but mongomock, which the tests run on
when no mongod is available, does not know ``$$NOW``; reading the time
first keeps one code path, the one the tests prove.) A value read just
before the query can be a round trip old: that only ever judges a lease
live a moment longer. mongomock has no ``hello``: there the clock of the
process that runs mongomock, which is the mock server's own, decides.

``Lease.is_valid()`` reads no wall clock: the ``time.monotonic()`` reading
taken before the server's time was read, plus the TTL, never later than the
server's ``expires_at`` (give or take the difference in clock *rates* over
one TTL). Stored times are at BSON's millisecond precision. Use
``w=majority`` in the URL on a replica set, or a failover may forget a grant.

What the tests prove: on real MongoDB (``MONGODB_URL`` set) everything
above. Without a server they run on mongomock, which proves the queries and
updates, the unique index (``DuplicateKeyError`` from pymongo's own class),
``$lte``/``$gt`` on timezone-aware datetimes, the millisecond truncation,
and (with a ``hello`` that tells a time, as mongod's does) that the server's
clock, not this host's, decides. It does not prove atomicity: mongomock's
``$inc`` is a read-modify-write in Python, ``find_one_and_update``
re-applies its update by ``_id`` after an unlocked find, and two deletes of
one document race into a ``KeyError``. This design needs no conditional
update to win a slot (only the unique insert, which mongomock does keep to
one winner), but the thread tests still serialize each mongomock call to
stand in for the server's single-document atomicity. Nor does mongomock
prove write concerns, the TTL monitor, or index builds on a populated
collection.

Error handling
==============

Every ``pymongo.errors.PyMongoError`` other than the duplicate key of a
contested slot (server selection timeout, connection refused, auth, an
index conflict) is raised as
:class:`~django_celery_adv.exceptions.LockError` chained with ``from``
(:meth:`~.base.LockBackend.translate_errors`). An acquire that raised after
inserting its document may leave that slot held until the lease's TTL
expires, never longer. Retryable writes (pymongo's default on replica sets)
are executed at most once by the server, so the client's own retry cannot
grant two slots.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from pymongo import ASCENDING, MongoClient, ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

from ...exceptions import InvalidLockBackendError
from ...masking import mask_url
from ...process import PerProcess
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


def _millis(value: datetime) -> datetime:
    # BSON dates hold milliseconds; truncating first makes a Lease equal to
    # what holders() reads back.
    return _aware(value).replace(microsecond=value.microsecond // 1000 * 1000)


def _after(start: datetime, seconds: float) -> datetime:
    # At least 1 ms: a zero TTL would grant a lease that is expired at birth.
    return start + timedelta(milliseconds=max(1, round(float(seconds) * 1000)))


def _aware(value: datetime) -> datetime:
    # pymongo returns naive UTC datetimes from a client made without
    # tz_aware=True (one handed in by a test's patch, say).
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _tells_time(admin: Database[dict[str, Any]]) -> bool:
    """Whether the server tells its clock in ``hello`` (mongomock has no ``hello``)."""
    try:
        return "localTime" in admin.command("hello")
    except NotImplementedError:  # mongomock answers only "ping"
        return False


@dataclass(frozen=True)
class _Client:
    """One process's client and collections."""

    mongo: MongoClient[dict[str, Any]]
    leases: Collection[dict[str, Any]]
    fences: Collection[dict[str, Any]]
    #: The server tells its time (mongod, mongos); else this process's clock.
    server_clock: bool

    def now(self) -> datetime:
        if self.server_clock:
            return _millis(self.mongo.admin.command("hello")["localTime"])
        return _millis(utcnow())


class MongoDBBackend(LockBackend):
    """Leases are documents, one per (name, slot); tokens come from a fence document.

    OPTIONS: ``url`` (required, ``mongodb://`` or ``mongodb+srv://``; client
    options such as ``serverSelectionTimeoutMS`` or ``w`` go in its query),
    ``database`` (default ``"celery_adv"``), ``collection`` (default ``"locks"``).
    """

    required_options = ("url",)
    client_errors = (PyMongoError,)

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        if not self.options.get("url"):
            raise InvalidLockBackendError(f"mongodb lock backend {alias!r} needs OPTIONS['url'].")
        self.url = str(self.options["url"])
        self.database = str(self.options.get("database") or DEFAULT_DATABASE)
        self.collection = str(self.options.get("collection") or DEFAULT_COLLECTION)
        self._client: PerProcess[_Client] = PerProcess(
            self._connect, close=lambda client: client.mongo.close())

    # -- the five operations ------------------------------------------------

    def acquire(self, name: str, capacity: int, holder: Holder, ttl: float) -> Lease | None:
        if capacity <= 0:
            return None
        with self.translate_errors(name):
            client = self._client.get()
            sent_at = time.monotonic()
            lease = self._acquire(client, name, capacity, holder, ttl, sent_at)
        if lease is not None:
            lease.confirm(sent_at, ttl)
        return lease

    def _acquire(self, client: _Client, name: str, capacity: int, holder: Holder,
                 ttl: float, sent_at: float) -> Lease | None:
        now = client.now()
        docs = list(client.leases.find({"name": name}, {"slot": 1, "expires_at": 1, "_id": 0}))
        if any(_aware(doc["expires_at"]) <= now for doc in docs):
            client.leases.delete_many({"name": name, "expires_at": {"$lte": now}})
        live = {doc["slot"] for doc in docs if _aware(doc["expires_at"]) > now}
        if len(live) >= capacity:
            return None
        expires_at = _after(now, ttl)
        for slot in sorted(set(range(capacity)) - live):
            try:
                doc_id = client.leases.insert_one({
                    "name": name, "slot": slot, "token": GRANTING, **holder.as_dict(),
                    "acquired_at": now, "expires_at": expires_at, "ttl": float(ttl),
                }).inserted_id
            except DuplicateKeyError:
                continue  # taken since we looked: the server picked one winner
            # Judged with the earlier ``now`` so that anything live then is counted.
            if client.leases.count_documents(
                    {"name": name, "expires_at": {"$gt": now}}) > capacity:
                client.leases.delete_one({"_id": doc_id})
                return None
            token = self._next_token(client, name)
            # Stalled past the TTL (by the monotonic clock, which runs out no
            # later than the server's expiry): the slot may be someone else's
            # by now, or soon; give it back. The document may also have been
            # reclaimed meanwhile, then the update matches nothing.
            if time.monotonic() >= sent_at + ttl or not client.leases.update_one(
                    {"_id": doc_id}, {"$set": {"token": token}}).matched_count:
                client.leases.delete_one({"_id": doc_id})
                return None
            return Lease(name=name, slot=slot, token=token, holder=holder,
                         acquired_at=now, expires_at=expires_at, ttl=ttl,
                         backend=self.alias)
        return None

    def _next_token(self, client: _Client, name: str) -> int:
        update = {"$inc": {"last_token": 1}}
        try:
            doc = client.fences.find_one_and_update(
                {"_id": name}, update, upsert=True, return_document=ReturnDocument.AFTER)
        except DuplicateKeyError:
            # Two first-ever upserts raced (servers before 4.2 do not retry
            # this themselves); the document exists now.
            doc = client.fences.find_one_and_update(
                {"_id": name}, update, return_document=ReturnDocument.AFTER)
        return int(doc["last_token"])

    def renew(self, lease: Lease) -> bool:
        with self.translate_errors(lease.name):
            client = self._client.get()
            sent_at = time.monotonic()
            now = client.now()
            expires_at = _after(now, lease.ttl)
            renewed = client.leases.update_one(
                {"name": lease.name, "slot": lease.slot, "token": lease.token,
                 "expires_at": {"$gt": now}},
                {"$set": {"expires_at": expires_at, "ttl": float(lease.ttl)}}).matched_count
        if renewed:
            lease.expires_at = expires_at
            lease.confirm(sent_at, lease.ttl)
        return bool(renewed)

    def release(self, lease: Lease) -> None:
        with self.translate_errors(lease.name):
            self._client.get().leases.delete_one(
                {"name": lease.name, "slot": lease.slot, "token": lease.token})

    def holders(self, name: str) -> list[Lease]:
        with self.translate_errors(name):
            client = self._client.get()
            docs = list(client.leases.find(
                {"name": name, "token": {"$gt": GRANTING}, "expires_at": {"$gt": client.now()}},
                sort=[("slot", ASCENDING)]))
        return [self._lease(doc) for doc in docs]

    def force_release(self, name: str, token: int) -> bool:
        if int(token) <= GRANTING:
            return False  # would match a document still being granted
        with self.translate_errors(name):
            client = self._client.get()
            return bool(client.leases.delete_one(
                {"name": name, "token": int(token),
                 "expires_at": {"$gt": client.now()}}).deleted_count)

    def close(self) -> None:
        self._client.close()

    def describe(self) -> str:
        return f"mongodb {mask_url(self.url)} {self.database}.{self.collection}"

    # -- helpers ---------------------------------------------------------------

    def _connect(self) -> _Client:
        mongo: MongoClient[dict[str, Any]] = MongoClient(self.url, tz_aware=True,
                                                         **self._timeouts())
        try:
            leases = mongo[self.database][self.collection]
            leases.create_index([("name", ASCENDING), ("slot", ASCENDING)], unique=True)
            leases.create_index([("name", ASCENDING), ("token", ASCENDING)])
            leases.create_index([("expires_at", ASCENDING)], expireAfterSeconds=GC_AFTER_SECONDS)
            server_clock = _tells_time(mongo.admin)
        except PyMongoError:
            mongo.close()  # else every failed attempt leaves monitor threads behind
            raise
        return _Client(mongo=mongo, leases=leases,
                       fences=mongo[self.database][f"{self.collection}.fences"],
                       server_clock=server_clock)

    def _timeouts(self) -> dict[str, int]:
        given = {key.lower() for key, _ in parse_qsl(urlsplit(self.url).query)}
        return {key: DEFAULT_TIMEOUT_MS
                for key in ("serverSelectionTimeoutMS", "connectTimeoutMS", "socketTimeoutMS")
                if key.lower() not in given}

    def _lease(self, doc: Mapping[str, Any]) -> Lease:
        return Lease(
            name=doc["name"], slot=int(doc["slot"]), token=int(doc["token"]),
            holder=Holder.from_dict(doc),
            acquired_at=_aware(doc["acquired_at"]), expires_at=_aware(doc["expires_at"]),
            ttl=float(doc["ttl"]), backend=self.alias,
        )
