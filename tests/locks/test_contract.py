"""The lock contract, one suite run against every backend on its real server.

Every generic property of a lock backend is held here, once; the per-backend
files keep only what is particular to one server. A test runs on every backend
unless ``@pytest.mark.capability(...)`` narrows it (see ``conftest.CAPABILITIES``):

* grants: lowest free slot first, never more holders than capacity, capacity 0
  grants nothing, a lowered capacity lets holders keep their slots and grants
  nothing until the count is below it;
* fencing tokens strictly grow, across clients and capacity changes;
* ``renew`` extends and confirms a held lease (``remaining()`` grows); a lease
  that expired is reclaimed, never renewed, and its stale holder can neither
  free nor renew the new holder's slot;
* ``force_release`` frees exactly a live token and returns True; a token that is
  no longer live (released, expired, unknown) returns False and frees nothing;
* a server that cannot be reached raises ``LockError`` within seconds from all
  five operations, with no secret in the message nor in ``describe()``;
* ``holders()`` lists slot, token, holder, times and TTL of every live lease;
* ``Lease.is_valid()`` follows the local monotonic clock only, and a lease
  belongs to the process that acquired it;
* tokens keep growing across a restart of the server exactly where the
  backend declares ``survives_restart_tokens`` (Redis without persistence
  starts its counter again: documented, and proven here so the claim stays true).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from unittest import mock

import pytest
from django.conf import settings
from django.db import connections
from django.db.utils import load_backend

from django_celery_adv.exceptions import LockError
from django_celery_adv.locks.backends import create_backend
from django_celery_adv.locks.backends.base import Holder, Lease, LockBackend
from tests.faults.servers import (
    EtcdServer,
    RedisServer,
    ServerProcess,
    ZooKeeperServer,
    spare_port,
    wait_until,
)
from tests.locks.conftest import CAPABILITIES, backend_params
from tests.locks.contention import contend, contend_processes

TTL = 30
#: A short TTL for expiry tests: etcd rounds lease TTLs up to its minimum (2 s).
SHORT_TTL = 2
#: Expiry is the server's: allow for etcd's 0.5 s expiry sweep and a loaded machine.
EXPIRY_SLACK = 2.0
#: What "fast" means for a server that cannot be reached (client timeouts of 1 s).
FAST = 5.0
SECRET = "s3cret"


def holder(task_id: str | None) -> Holder:
    return Holder(task_id=task_id, hostname="contract-host", pid=4242)


def tokens_of(backend: LockBackend, name: str) -> list[int]:
    return [lease.token for lease in backend.holders(name)]


def wait_for_grant(backend: LockBackend, name: str, capacity: int, task_id: str,
                   deadline: float) -> Lease:
    """Poll ``acquire`` until granted; fail the test past ``deadline`` (monotonic)."""
    while True:
        lease = backend.acquire(name, capacity, holder(task_id), TTL)
        if lease is not None:
            return lease
        assert time.monotonic() < deadline, f"{name}: no grant before the deadline"
        time.sleep(0.05)


# -- grants and capacity ----------------------------------------------------------

def test_grants_the_lowest_free_slot_up_to_capacity(backend, lock_name):
    leases = [backend.acquire(lock_name, 3, holder(f"t-{i}"), TTL) for i in range(3)]

    assert [lease.slot for lease in leases] == [0, 1, 2]
    assert backend.acquire(lock_name, 3, holder("t-3"), TTL) is None
    backend.release(leases[1])
    again = backend.acquire(lock_name, 3, holder("t-4"), TTL)
    assert again is not None and again.slot == 1
    assert [(h.slot, h.holder.task_id) for h in backend.holders(lock_name)] == [
        (0, "t-0"), (1, "t-4"), (2, "t-2")]
    backend.release(leases[0])
    assert backend.acquire(lock_name, 3, holder("t-5"), TTL).slot == 0


def test_capacity_zero_grants_nothing(backend, lock_name):
    assert backend.acquire(lock_name, 0, holder("t"), TTL) is None
    assert backend.holders(lock_name) == []
    assert backend.acquire(lock_name, 1, holder("t"), TTL) is not None  # not left broken


def test_release_frees_the_slot_and_twice_is_harmless(backend, lock_name):
    lease = backend.acquire(lock_name, 1, holder("t"), TTL)
    backend.release(lease)
    backend.release(lease)

    assert backend.holders(lock_name) == []
    assert backend.acquire(lock_name, 1, holder("u"), TTL) is not None


def test_lowered_capacity_keeps_holders_and_grants_nothing_until_below_it(backend, lock_name):
    held = [backend.acquire(lock_name, 3, holder(f"t-{i}"), TTL) for i in range(3)]
    assert all(held)

    assert backend.acquire(lock_name, 2, holder("new"), TTL) is None
    assert backend.acquire(lock_name, 1, holder("new"), TTL) is None
    backend.release(held[0])
    assert backend.acquire(lock_name, 2, holder("new"), TTL) is None  # 2 held, capacity 2
    assert all(backend.renew(lease) for lease in held[1:])  # holders keep theirs
    assert tokens_of(backend, lock_name) == [held[1].token, held[2].token]
    backend.release(held[1])
    granted = backend.acquire(lock_name, 2, holder("new"), TTL)

    assert granted is not None and granted.slot == 0
    assert [(h.slot, h.holder.task_id) for h in backend.holders(lock_name)] == [
        (0, "new"), (2, "t-2")]
    assert backend.acquire(lock_name, 2, holder("more"), TTL) is None
    assert backend.acquire(lock_name, 1, holder("more"), TTL) is None


def test_names_are_independent_whatever_characters_they_hold(backend, lock_name):
    suffixes = ["", "/slots", "/slots/0", ":slots", "}", "*", ".x", " x", "\u00e9"]
    leases = [backend.acquire(lock_name + suffix, 1, holder(f"t{suffix}"), TTL)
              for suffix in suffixes]

    assert [lease is not None and lease.slot for lease in leases] == [0] * len(suffixes)
    assert [h.holder.task_id for h in backend.holders(lock_name)] == ["t"]
    assert [h.holder.task_id for h in backend.holders(lock_name + "/slots")] == ["t/slots"]
    backend.release(leases[0])
    assert backend.holders(lock_name) == []
    assert len(backend.holders(lock_name + "/slots/0")) == 1


# -- fencing tokens -----------------------------------------------------------------

def test_tokens_strictly_grow_across_clients_and_capacity_changes(backend_name, make_backend,
                                                                  lock_name):
    first, second = make_backend(backend_name), make_backend(backend_name)  # one counter
    tokens, kept = [], []
    for i, capacity in enumerate([1, 3, 2, 1, 4, 4, 4, 3]):
        client = first if i % 2 else second
        lease = client.acquire(lock_name, capacity, holder(f"t-{i}"), TTL)
        assert lease is not None, (i, capacity)
        tokens.append(lease.token)
        if i in (4, 6):  # some stay held: grants into fresh and into reused slots
            kept.append(lease)
        else:
            client.release(lease)

    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), tokens
    assert tokens_of(first, lock_name) == [lease.token for lease in kept]


# -- renewal, expiry, stale holders ---------------------------------------------------

def test_renew_extends_and_confirms_a_held_lease(backend, lock_name):
    lease = backend.acquire(lock_name, 1, holder("t"), 5)
    assert lease.is_valid()
    time.sleep(0.3)
    remaining, expires_at = lease.remaining(), lease.expires_at

    assert backend.renew(lease) is True
    assert lease.remaining() > remaining  # confirmed from the renewal's request
    assert lease.is_valid()
    assert lease.expires_at >= expires_at
    assert tokens_of(backend, lock_name) == [lease.token]
    assert backend.acquire(lock_name, 1, holder("intruder"), TTL) is None


@pytest.mark.capability("ttl_expiry")
def test_renewals_keep_a_lease_past_its_first_ttl(backend, lock_name):
    lease = backend.acquire(lock_name, 1, holder("t"), SHORT_TTL)
    started = time.monotonic()
    while time.monotonic() - started < SHORT_TTL * 1.5:
        time.sleep(SHORT_TTL / 4)
        assert backend.renew(lease) is True

    assert lease.is_valid()
    [listed] = backend.holders(lock_name)
    assert listed.token == lease.token and listed.expires_at > datetime.now(UTC)
    assert backend.acquire(lock_name, 1, holder("intruder"), TTL) is None


@pytest.mark.capability("ttl_expiry")
def test_expired_lease_is_lost_and_its_slot_reclaimed_with_a_greater_token(
        backend_name, make_backend, lock_name):
    backend, other = make_backend(backend_name), make_backend(backend_name)
    started = time.monotonic()
    old = backend.acquire(lock_name, 1, holder("old"), SHORT_TTL)
    assert other.acquire(lock_name, 1, holder("early"), TTL) is None

    new = wait_for_grant(other, lock_name, 1, "new", started + SHORT_TTL + EXPIRY_SLACK)
    # Redlock's rule: by the time anyone else is granted the slot, the old
    # holder's own (monotonic) clock already says it is no longer valid.
    assert not old.is_valid()
    assert time.monotonic() - started >= SHORT_TTL - 0.1  # not before its TTL
    assert (new.slot, old.slot) == (0, 0) and new.token > old.token

    assert backend.renew(old) is False
    backend.release(old)
    assert backend.force_release(lock_name, old.token) is False
    assert [(h.token, h.holder.task_id) for h in other.holders(lock_name)] == [(new.token, "new")]
    assert other.renew(new) is True
    assert backend.acquire(lock_name, 1, holder("third"), TTL) is None


@pytest.mark.capability("ttl_expiry")
def test_expired_lease_frees_its_slot_without_any_acquirer(backend, lock_name):
    started = time.monotonic()
    lease = backend.acquire(lock_name, 1, holder("gone"), SHORT_TTL)
    while backend.holders(lock_name):
        assert time.monotonic() - started < SHORT_TTL + EXPIRY_SLACK, "still listed"
        time.sleep(0.1)

    assert not lease.is_valid()
    assert backend.force_release(lock_name, lease.token) is False
    assert backend.renew(lease) is False
    assert backend.holders(lock_name) == []
    assert backend.acquire(lock_name, 1, holder("next"), TTL) is not None


def test_stale_holder_can_neither_free_nor_renew_the_new_holders_slot(backend, lock_name):
    stale = backend.acquire(lock_name, 1, holder("stale"), TTL)
    assert backend.force_release(lock_name, stale.token) is True
    fresh = backend.acquire(lock_name, 1, holder("fresh"), TTL)
    assert fresh is not None and fresh.token > stale.token and fresh.slot == stale.slot

    backend.release(stale)
    assert backend.renew(stale) is False

    assert tokens_of(backend, lock_name) == [fresh.token]
    assert backend.acquire(lock_name, 1, holder("third"), TTL) is None
    assert backend.renew(fresh) is True


# -- force release ------------------------------------------------------------------------

def test_force_release_frees_exactly_a_live_token(backend, lock_name):
    first = backend.acquire(lock_name, 2, holder("a"), TTL)
    second = backend.acquire(lock_name, 2, holder("b"), TTL)

    assert backend.force_release(lock_name, first.token) is True
    assert backend.force_release(lock_name, first.token) is False  # no longer live
    assert backend.force_release(lock_name, second.token + 1_000_000) is False  # unknown
    assert backend.force_release(f"{lock_name}-other", second.token) is False  # other lock
    assert tokens_of(backend, lock_name) == [second.token]
    assert backend.renew(first) is False
    assert backend.renew(second) is True
    assert backend.acquire(lock_name, 2, holder("c"), TTL).slot == first.slot


def test_force_release_of_a_released_lease_is_false(backend, lock_name):
    lease = backend.acquire(lock_name, 1, holder("t"), TTL)
    backend.release(lease)

    assert backend.force_release(lock_name, lease.token) is False
    assert backend.holders(lock_name) == []


# -- holders(), lease fields, validity ------------------------------------------------------

def test_lease_and_holders_fields(backend, lock_name):
    before = datetime.now(UTC)
    lease = backend.acquire(lock_name, 2, holder("task-1"), 12.5)
    anonymous = backend.acquire(lock_name, 2, holder(None), 12.5)

    assert (lease.name, lease.slot, lease.backend, lease.ttl) == (
        lock_name, 0, backend.alias, 12.5)
    assert lease.owner_pid == os.getpid()
    assert lease.acquired_at <= lease.expires_at
    assert (lease.expires_at - lease.acquired_at).total_seconds() == pytest.approx(12.5, abs=0.1)
    # Display times (the server's clock where it has one) on this host's time axis.
    assert abs(lease.acquired_at - before) < timedelta(seconds=5)
    assert lease.acquired_at.tzinfo is not None
    listed = backend.holders(lock_name)
    assert [(h.name, h.slot, h.token, h.backend) for h in listed] == [
        (lock_name, 0, lease.token, backend.alias), (lock_name, 1, anonymous.token, backend.alias)]
    assert [h.holder for h in listed] == [holder("task-1"), holder(None)]
    # holders() reads back the grant's own display time (same precision).
    assert [h.acquired_at for h in listed] == [lease.acquired_at, anonymous.acquired_at]
    for h in listed:
        assert h.acquired_at <= h.expires_at
        assert h.ttl == pytest.approx(12.5)
        assert not h.is_valid()  # a listing is no lease this process may count on


def test_validity_follows_the_monotonic_clock_only(backend, lock_name):
    lease = backend.acquire(lock_name, 1, holder("t"), TTL)
    assert lease.is_valid()
    assert 0 < lease.remaining() <= TTL
    real_monotonic, real_time = time.monotonic, time.time

    with mock.patch("time.time", lambda: real_time() + 3600):
        assert lease.is_valid()  # a wall clock moved forward changes nothing
    with mock.patch("time.monotonic", lambda: real_monotonic() + TTL + 1):
        assert not lease.is_valid()
        assert lease.remaining() < 0
    assert lease.is_valid()
    assert tokens_of(backend, lock_name) == [lease.token]  # the server still holds it


# -- a server that cannot be reached ------------------------------------------------------

@contextlib.contextmanager
def unreachable_database(port: int) -> Iterator[str]:
    """A database alias nobody answers on, with a password in its settings.

    Registered for this thread only (not in ``DATABASES``), so the test
    database machinery neither creates nor flushes it."""
    alias = "contract-unreachable"
    config = copy.deepcopy(settings.DATABASES["default"])
    if config["ENGINE"].endswith("sqlite3"):
        config["NAME"] = f"/nonexistent-{port}/locks.sqlite3"
    else:
        config.update(HOST="127.0.0.1", PORT=str(port), PASSWORD=SECRET,
                      OPTIONS={"connect_timeout": 1})
    configured = connections.configure_settings({"default": {}, alias: config})[alias]
    connections[alias] = load_backend(config["ENGINE"]).DatabaseWrapper(configured, alias)
    try:
        yield alias
    finally:
        connections[alias].close()
        del connections[alias]


@pytest.fixture
def unreachable(backend_name, make_backend) -> Iterator[LockBackend]:
    """The backend pointed at a loopback port nobody listens on, 1 s client timeouts,
    a password in its connection settings where the backend takes one."""
    port = spare_port()
    with contextlib.ExitStack() as stack:
        if backend_name == "redis":
            yield make_backend("redis", url=f"redis://:{SECRET}@127.0.0.1:{port}/0",
                               socket_timeout=1)
        elif backend_name == "zookeeper":
            yield make_backend("zookeeper", hosts=f"127.0.0.1:{port}", connect_timeout=1)
        elif backend_name == "etcd":
            yield make_backend("etcd", host="127.0.0.1", port=port, timeout=1)
        elif backend_name == "mongodb":
            # Real pymongo, never mongomock: nothing listens there.
            url = (f"mongodb://locks:{SECRET}@127.0.0.1:{port}/"
                   "?serverSelectionTimeoutMS=1000&connectTimeoutMS=1000")
            backend = create_backend("mongodb", {**backend_params("mongodb"),
                                                 "OPTIONS": {"url": url}})
            stack.callback(backend.close)
            yield backend
        else:
            alias = stack.enter_context(unreachable_database(port))
            yield make_backend("database", using=alias)


def test_unreachable_server_raises_lock_error_fast_without_secrets(unreachable):
    backend = unreachable
    now = datetime.now(UTC)
    lease = Lease(name="down", slot=0, token=1, holder=holder("t"), acquired_at=now,
                  expires_at=now + timedelta(seconds=TTL), ttl=TTL, backend=backend.alias)
    lease.confirm(time.monotonic(), TTL)
    operations: dict[str, Callable[[], object]] = {
        "acquire": lambda: backend.acquire("down", 1, holder("t"), TTL),
        "renew": lambda: backend.renew(lease),
        "release": lambda: backend.release(lease),
        "holders": lambda: backend.holders("down"),
        "force_release": lambda: backend.force_release("down", 1),
    }
    described = backend.describe()
    assert SECRET not in described

    for operation, call in operations.items():
        started = time.monotonic()
        with pytest.raises(LockError) as caught:
            call()
        elapsed = time.monotonic() - started
        assert elapsed < FAST, f"{operation} took {elapsed:.1f} s"
        message = str(caught.value)
        assert SECRET not in message, operation
        assert backend.alias in message and described in message, (operation, message)
        assert caught.value.__cause__ is not None, operation  # chained: the client's error


# -- contention: threads of one process, forked processes ----------------------------------

def test_threads_never_exceed_capacity(backend, lock_name):
    capacity, threads, rounds = 2, 8, 10
    seen = contend(backend, lock_name, capacity, threads=threads, rounds=rounds)

    assert not seen.errors, seen.errors[:3]
    assert seen.grants == threads * rounds
    assert seen.over == 0 and 1 <= seen.peak <= capacity
    assert len(set(seen.tokens)) == len(seen.tokens)  # every grant had its own token
    assert backend.holders(lock_name) == []


@pytest.mark.capability("cross_process")
def test_processes_never_exceed_capacity(backend_name, make_backend, lock_name):
    capacity, processes, rounds = 2, 4, 6
    parent = make_backend(backend_name)
    parent.holders(lock_name)  # the parent's client exists before the fork
    seen = contend_processes(lambda: create_backend(backend_name, backend_params(backend_name)),
                             lock_name, capacity, processes=processes, rounds=rounds)

    assert not seen.errors, seen.errors[0]
    assert seen.exitcodes == [0] * processes
    assert seen.grants == processes * rounds
    assert seen.over == 0 and 1 <= seen.peak <= capacity
    assert len(set(seen.tokens)) == len(seen.tokens)
    assert parent.holders(lock_name) == []  # the parent's client survived the children


# -- a server restart ----------------------------------------------------------------------

OWN_SERVERS: dict[str, type[ServerProcess]] = {
    "redis": RedisServer, "zookeeper": ZooKeeperServer, "etcd": EtcdServer}


def own_server_options(backend_name: str, server: ServerProcess) -> dict[str, object]:
    if backend_name == "redis":
        return {"url": server.url}
    if backend_name == "zookeeper":
        return {"hosts": server.hosts}
    return {"host": "127.0.0.1", "port": server.port}


@pytest.fixture
def own_server(backend_name) -> Iterator[ServerProcess]:
    """A server instance of this test's own, on a spare port (the shared one is never
    restarted)."""
    server = OWN_SERVERS[backend_name]().start()
    yield server
    server.remove()


@pytest.mark.capability("own_server")
def test_tokens_after_a_server_restart_grow_exactly_where_declared(backend_name, make_backend,
                                                                   own_server, lock_name):
    options = own_server_options(backend_name, own_server)
    before = make_backend(backend_name, **options)
    tokens = []
    for i in range(3):
        lease = before.acquire(lock_name, 1, holder(f"t-{i}"), TTL)
        tokens.append(lease.token)
        before.release(lease)

    own_server.restart()
    after = make_backend(backend_name, **options)
    granted: list[Lease] = []

    def grant() -> bool:
        with contextlib.suppress(LockError):  # the server may still be warming up
            granted.append(after.acquire(lock_name, 1, holder("after"), TTL))
        return bool(granted)

    wait_until(grant, 30, f"a grant from {backend_name} after its restart")
    [lease] = granted
    assert lease is not None
    if "survives_restart_tokens" in CAPABILITIES[backend_name]:
        assert lease.token > tokens[-1], (tokens, lease.token)
    else:  # the counter was lost with the server's memory: tokens start again
        assert lease.token <= tokens[-1], (tokens, lease.token)
