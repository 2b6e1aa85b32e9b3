"""MongoDBBackend beyond the shared contract, on a real mongod (MONGODB_URL) or mongomock.

The mode is the test id (``[mongod]`` or ``[mongomock]``) and is printed once
per session even under ``-q``. In mongomock mode ``MongoClient`` in the backend
module is patched to a mongomock client on one in-memory server per test,
and every mongomock collection call is serialized: mongomock is not atomic
across threads (its ``$inc`` and ``find_one_and_update`` read and write in
separate Python steps), whereas a real server applies each single-document
operation atomically. Only the server-down test runs pymongo unpatched.

Only what is specific to MongoDB lives here (documents, indexes, the fence
document, the non-atomic acquire's back-off paths, whose clock decides); the
contract every backend keeps is in test_contract.py. The clock tests need a
server that tells its time: mongod does (``hello``'s ``localTime``); in
mongomock mode the ``server_clock`` fixture gives mongomock such a ``hello``,
and this host's clock is moved by patching the backend's wall clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import pytest
from django.conf import settings
from pymongo.errors import ServerSelectionTimeoutError

from django_celery_adv.exceptions import InvalidLockBackendError, LockError
from django_celery_adv.locks.backends import mongodb
from django_celery_adv.locks.backends.base import Holder, Lease
from django_celery_adv.locks.backends.mongodb import GC_AFTER_SECONDS, MongoDBBackend
from django_celery_adv.masking import mask_url
from tests.locks.contention import Contention, contend

TTL = 30
MODE = "mongod" if settings.MONGODB_URL else "mongomock"
#: What mongomock mode connects to: nothing listens there, so a missing patch fails loudly.
MONGOMOCK_URL = "mongodb://127.0.0.1:27017"
#: Filled once the mode was printed: once per session is enough.
_announced: list[str] = []
SERIALIZED = ("insert_one", "find", "find_one_and_update", "update_one", "delete_one",
              "delete_many", "count_documents", "create_index")


def holder(task_id: str) -> Holder:
    return Holder(task_id=task_id, hostname="mongo-test-host", pid=27017)


def _serialized(method: Callable[..., Any], server: threading.RLock,
                materialize: bool) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        with server:
            result = method(*args, **kwargs)
            return iter(list(result)) if materialize else result
    return call


@pytest.fixture(params=[MODE], ids=[MODE])
def options(request, capsys) -> Iterator[dict[str, str]]:
    """OPTIONS of a backend on this test's own collection, in the mode of the run."""
    text = (f"MongoDB lock backend: mongod at {mask_url(settings.MONGODB_URL)}"
            if MODE == "mongod" else
            "MongoDB lock backend: mongomock (set MONGODB_URL to test a real mongod)")
    if not _announced:
        _announced.append(text)
        with capsys.disabled():
            print(f"\n{text}")
    opts = {"database": "celery_adv_test", "collection": f"locks_{uuid.uuid4().hex[:10]}"}
    if MODE == "mongod":
        import pymongo

        opts["url"] = settings.MONGODB_URL
        yield opts
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(opts["url"])
        client[opts["database"]].drop_collection(opts["collection"])
        client[opts["database"]].drop_collection(f"{opts['collection']}.fences")
        client.close()
        return

    import mongomock
    from mongomock.store import ServerStore

    store, server = ServerStore(), threading.RLock()
    patches = [mock.patch.object(mongomock.collection.Collection, name, _serialized(
        getattr(mongomock.collection.Collection, name), server, name == "find"))
        for name in SERIALIZED]
    patches.append(mock.patch("django_celery_adv.locks.backends.mongodb.MongoClient",
                              functools.partial(mongomock.MongoClient, _store=store)))
    for patch in patches:
        patch.start()
    opts["url"] = MONGOMOCK_URL
    try:
        yield opts
    finally:
        for patch in reversed(patches):
            patch.stop()


@pytest.fixture
def make(options) -> Iterator[Callable[[], MongoDBBackend]]:
    made: list[MongoDBBackend] = []

    def build() -> MongoDBBackend:
        backend = MongoDBBackend("mongodb", options)
        made.append(backend)
        return backend

    yield build
    for backend in made:
        backend.close()


@pytest.fixture
def backend(make) -> MongoDBBackend:
    return make()


@pytest.fixture
def name() -> str:
    return f"lock-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def server_clock(options) -> Iterator[Callable[[timedelta], None]]:
    """A server that tells its time in ``hello``, as mongod does. Call it with
    the server's offset from the real clock (mongomock mode only; a real
    mongod tells its own time and ignores the offset)."""
    offset = [timedelta(0)]

    def move(by: timedelta) -> None:
        offset[0] = by

    if MODE == "mongod":
        yield move
        return
    import mongomock

    real_command = mongomock.database.Database.command

    def command(self, command, **kwargs):
        if command == "hello":
            return {"ok": 1.0, "isWritablePrimary": True,
                    "localTime": datetime.now(UTC) + offset[0]}
        return real_command(self, command, **kwargs)

    with mock.patch.object(mongomock.database.Database, "command", command):
        yield move


@contextlib.contextmanager
def host_clock(by: timedelta) -> Iterator[None]:
    """This host's wall clock moved by ``by`` (what the backend reads of it)."""
    with mock.patch.object(mongodb, "utcnow", lambda: datetime.now(UTC) + by):
        yield


def docs(backend: MongoDBBackend, name: str) -> list[dict[str, Any]]:
    return list(backend._client.get().leases.find({"name": name}, sort=[("slot", 1)]))


def test_lease_fields_match_what_holders_reads_back(backend, name):
    lease = backend.acquire(name, 2, holder("task-1"), 12.5)

    assert (lease.ttl, lease.backend, lease.name) == (12.5, "mongodb", name)
    assert lease.acquired_at.microsecond % 1000 == 0  # BSON keeps milliseconds
    assert lease.acquired_at <= datetime.now(UTC) < lease.expires_at
    [listed] = backend.holders(name)
    assert listed.holder == Holder(task_id="task-1", hostname="mongo-test-host", pid=27017)
    assert (listed.token, listed.acquired_at, listed.expires_at, listed.ttl) == (
        lease.token, lease.acquired_at, lease.expires_at, 12.5)


def test_renew_restarts_validity_from_before_its_request(backend, name):
    lease = backend.acquire(name, 1, holder("t"), 1)
    granted_until = lease.valid_until
    time.sleep(0.3)

    sent = time.monotonic()
    assert backend.renew(lease) is True
    # Counted from when the renewal was sent (monotonic), not from the grant
    # and not from any wall clock.
    assert lease.valid_until - granted_until >= 0.3
    assert sent + 1 <= lease.valid_until <= time.monotonic() + 1


def test_the_servers_clock_decides_where_the_server_tells_it(make, server_clock, name):
    server_clock(timedelta(hours=1))
    backend = make()

    lease = backend.acquire(name, 1, holder("t"), TTL)

    assert backend._client.get().server_clock is True
    if MODE == "mongomock":  # a mongod's clock is not ours to move
        assert abs((lease.acquired_at - datetime.now(UTC)) - timedelta(hours=1)) < timedelta(
            seconds=5)
    [listed] = backend.holders(name)
    assert listed.expires_at == lease.expires_at


def test_plain_mongomock_falls_back_to_this_process_clock(backend, name):
    with host_clock(timedelta(hours=-1)):
        lease = backend.acquire(name, 1, holder("t"), TTL)

    # mongomock has no hello: its clock is this process's (here moved back an
    # hour); a mongod tells its own.
    assert backend._client.get().server_clock is (MODE == "mongod")
    moved = (lease.acquired_at - datetime.now(UTC)) + timedelta(hours=1)
    assert (abs(moved) < timedelta(seconds=5)) is (MODE == "mongomock")


def test_host_whose_clock_is_ahead_is_not_granted_a_held_lock(make, server_clock, name):
    held = make().acquire(name, 1, holder("held"), 3)
    ahead = make()

    with host_clock(timedelta(seconds=5)):
        assert ahead.acquire(name, 1, holder("ahead"), TTL) is None, (
            f"granted while {held.holder.task_id!r} held the lock until {held.expires_at}")
    assert [h.token for h in ahead.holders(name)] == [held.token]


def test_holder_whose_clock_is_behind_keeps_its_slot_and_stops_counting_on_it(
        make, server_clock, name):
    behind, here = make(), make()
    with host_clock(timedelta(seconds=-5)):
        lease = behind.acquire(name, 1, holder("behind"), 2)
    assert lease is not None

    # Live for its TTL by the server's clock, whatever the holder's clock says ...
    assert here.acquire(name, 1, holder("here"), TTL) is None, (
        f"granted at once: the lease written by a host 5 s behind expired at "
        f"{lease.expires_at}")
    deadline = time.monotonic() + 10
    while (mine := here.acquire(name, 1, holder("here"), TTL)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # ... and once another holds it, the old holder no longer counts on it.
    with host_clock(timedelta(seconds=-5)):
        assert not lease.is_valid()
    assert mine.token > lease.token


def test_indexes(backend, name):
    backend.holders(name)
    info = backend._client.get().leases.index_information()

    unique = [spec for spec in info.values() if spec.get("unique")]
    assert [spec["key"] for spec in unique] == [[("name", 1), ("slot", 1)]]
    [gc] = [spec for spec in info.values() if "expireAfterSeconds" in spec]
    assert (gc["key"], gc["expireAfterSeconds"]) == ([("expires_at", 1)], GC_AFTER_SECONDS)


def test_tokens_strictly_increase(make, name):
    first, second = make(), make()  # two hosts, one fence document
    tokens = []
    for i in range(10):
        backend = first if i % 2 else second
        lease = backend.acquire(name, 4, holder(f"t{i}"), TTL)
        tokens.append(lease.token)
        if i % 3:  # keep every third: grants into fresh and into reused slots
            backend.release(lease)

    assert tokens == sorted(set(tokens))  # strictly increasing
    fence = first._client.get().fences.find_one({"_id": name})
    assert fence["last_token"] == tokens[-1]


def test_expired_lease_is_reclaimed_by_acquire(backend, name):
    old = backend.acquire(name, 1, holder("old"), 1)
    assert backend.acquire(name, 1, holder("new"), TTL) is None
    time.sleep(1.2)

    assert backend.holders(name) == []
    assert [doc["token"] for doc in docs(backend, name)] == [old.token]  # not collected yet
    new = backend.acquire(name, 1, holder("new"), TTL)
    assert (new.slot, new.token > old.token) == (0, True)
    assert [doc["token"] for doc in docs(backend, name)] == [new.token]


class _StaleRead:
    """Leases collection whose first read misses one slot, like a read made just too early."""

    def __init__(self, leases: Any, hidden_slot: int) -> None:
        self._leases, self._hidden_slot = leases, hidden_slot

    def find(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return [doc for doc in self._leases.find(*args, **kwargs)
                if doc.get("slot") != self._hidden_slot]

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._leases, attr)


def test_acquirer_that_slipped_past_a_lowered_capacity_backs_off(backend, name):
    held = [backend.acquire(name, 3, holder(f"t{i}"), TTL) for i in range(3)]
    backend.release(held[1])  # live: slots 0 and 2
    client = backend._client.get()
    stale = dataclasses.replace(client, leases=_StaleRead(client.leases, hidden_slot=0))

    # Its read saw one holder (slot 2) below capacity 2; it inserts slot 1,
    # then counts three live leases and withdraws.
    with mock.patch.object(backend._client, "get", return_value=stale):
        assert backend.acquire(name, 2, holder("late"), TTL) is None
    assert [doc["slot"] for doc in docs(backend, name)] == [0, 2]
    assert backend.acquire(name, 3, holder("next"), TTL).token == held[2].token + 1


def test_acquirer_that_stalls_past_its_ttl_gets_nothing(make, name):
    slow, fast = make(), make()
    real_next_token = MongoDBBackend._next_token
    rival: list[Lease | None] = []

    def stalled(self, conn, lock_name):
        time.sleep(0.5)  # our document (ttl 0.3 s) expires meanwhile ...
        rival.append(fast.acquire(name, 1, holder("fast"), TTL))  # ... and is reclaimed
        return real_next_token(self, conn, lock_name)

    with mock.patch.object(slow, "_next_token", stalled.__get__(slow)):
        assert slow.acquire(name, 1, holder("slow"), 0.3) is None
    [winner] = rival
    assert [h.token for h in slow.holders(name)] == [winner.token]
    assert slow.acquire(name, 1, holder("again"), TTL) is None


def test_a_document_being_granted_is_not_a_holder(backend, name):
    lease = backend.acquire(name, 2, holder("a"), TTL)
    backend._client.get().leases.insert_one({"name": name, "slot": 1, "token": mongodb.GRANTING,
                            **holder("pending").as_dict(), "acquired_at": lease.acquired_at,
                            "expires_at": lease.expires_at, "ttl": float(TTL)})

    assert [h.token for h in backend.holders(name)] == [lease.token]
    assert backend.force_release(name, mongodb.GRANTING) is False
    assert backend.acquire(name, 2, holder("b"), TTL) is None  # the slot is still taken


def test_server_down_raises_lock_error():
    # Real pymongo, unpatched: nothing listens on port 1.
    backend = MongoDBBackend("down", {"url": "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300"})
    lease = Lease(name="x", slot=0, token=1, holder=holder("t"), acquired_at=datetime.now(UTC),
                  expires_at=datetime.now(UTC), backend="down")
    calls = [lambda: backend.acquire("x", 1, holder("t"), TTL), lambda: backend.renew(lease),
             lambda: backend.release(lease), lambda: backend.holders("x"),
             lambda: backend.force_release("x", 1)]

    for call in calls:
        started = time.monotonic()
        with pytest.raises(LockError) as info:
            call()
        assert isinstance(info.value.__cause__, ServerSelectionTimeoutError)
        assert time.monotonic() - started < 3
    assert backend._client.peek() is None  # nothing half-built is kept


def test_timeouts_default_to_five_seconds_unless_the_url_sets_them():
    plain = MongoDBBackend("m", {"url": "mongodb://h:27017"})
    tuned = MongoDBBackend("m", {"url": "mongodb://h:27017/?serverselectiontimeoutms=100"})

    assert plain._timeouts() == {"serverSelectionTimeoutMS": 5000, "connectTimeoutMS": 5000,
                                 "socketTimeoutMS": 5000}
    assert "serverSelectionTimeoutMS" not in tuned._timeouts()


def test_url_is_required():
    with pytest.raises(InvalidLockBackendError):
        MongoDBBackend("m", {"database": "x"})
    assert MongoDBBackend.required_options == ("url",)


def _hammer(backend: MongoDBBackend, name: str, capacity: int, threads: int,
            already_held: int = 0) -> Contention:
    seen = contend(backend, name, capacity, threads=threads, attempts=25, seconds=4,
                   idle=0.001, already_held=already_held)
    assert not seen.errors, seen.errors[:3]
    return seen


def test_sixteen_threads_respect_a_lowered_capacity(backend, name):
    held = [backend.acquire(name, 3, holder(f"t{i}"), TTL) for i in range(3)]
    backend.release(held[0])
    backend.release(held[1])  # slot 2 stays held above the new capacity 2

    seen = _hammer(backend, name, capacity=2, threads=16, already_held=1)

    assert seen.over == 0 and seen.peak == 2
    assert seen.grants > 16
    assert [h.slot for h in backend.holders(name)] == [2]
