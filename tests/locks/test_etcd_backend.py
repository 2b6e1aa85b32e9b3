"""EtcdBackend on the real etcd: what is particular to its slot-key semaphore.

The shared suite (test_contract.py) covers the contract and test_etcd_faults.py
the fault experiments; these tests cover slot keys and their etcd leases (none
may leak, tokens are the keys' create revisions), names that cannot reach into
each other's keys, expiry by etcd's lease TTL and its granularity, a forked
child's own HTTP session, and a server that accepts connections but never answers.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from django.conf import settings
from etcd3gw.client import Etcd3Client

from django_celery_adv.exceptions import LockError
from django_celery_adv.locks.backends.base import Holder
from django_celery_adv.locks.backends.etcd import EtcdBackend
from tests.faults.servers import wait_until
from tests.locks.contention import contend

TTL = 30


def holder(task_id: str) -> Holder:
    return Holder(task_id=task_id, hostname="etcd-test-host", pid=4242)


@pytest.fixture(scope="module")
def etcd_address() -> tuple[str, int]:
    address = (settings.ETCD_HOST, settings.ETCD_PORT)
    try:
        socket.create_connection(address, timeout=2).close()
    except OSError as e:
        pytest.fail(f"etcd is not reachable at {address} ({e}): run scripts/services.sh start")
    return address


@pytest.fixture
def prefix() -> str:
    return f"/celery-adv-test/etcd-backend-{uuid.uuid4().hex[:12]}/"


@pytest.fixture
def make(etcd_address, prefix) -> Iterator[Callable[..., EtcdBackend]]:
    made: list[EtcdBackend] = []

    def make(**options) -> EtcdBackend:
        host, port = etcd_address
        backend = EtcdBackend("etcd", {"host": host, "port": port, "prefix": prefix, **options})
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def backend(make) -> EtcdBackend:
    return make()


@pytest.fixture
def raw(etcd_address) -> Etcd3Client:
    host, port = etcd_address
    return Etcd3Client(host=host, port=port, timeout=5)


def lease_ttl(raw: Etcd3Client, lease_id: int) -> int:
    """Seconds left on an etcd lease; -1 once etcd no longer knows it."""
    info = raw.post(raw.get_url("/kv/lease/timetolive"), json={"ID": lease_id})
    return int(info.get("TTL", 0))


def slot_keys(raw: Etcd3Client, prefix: str, name: str) -> list[str]:
    return sorted(meta["key"].decode() for _, meta in raw.get_prefix(f"{prefix}{name}/slots/"))


# -- slot keys and their etcd leases ------------------------------------------------

def test_sixteen_threads_leak_no_etcd_lease(backend, raw):
    """Grants that lost a race or found the lock full revoke their lease at once."""
    client = backend._clients.get()
    granted: list[int] = []
    grant = client.lease

    def recording_grant(ttl):
        lease = grant(ttl)
        granted.append(lease.id)
        return lease

    client.lease = recording_grant
    seen = contend(backend, "sixteen", 3, threads=16, rounds=6, hold=0.01)

    assert not seen.errors, seen.errors[:3]
    assert seen.grants == 16 * 6 and seen.peak <= 3
    assert backend.holders("sixteen") == []
    assert len(granted) >= 16 * 6
    assert {lease_ttl(raw, lease_id) for lease_id in granted} == {-1}


def test_tokens_are_the_create_revisions_of_slot_keys_named_by_slot(backend, raw, prefix):
    raw.put("/celery-adv-test/unrelated", "moves the revision on")
    held = [backend.acquire("tokens", 3, holder(f"h{i}"), TTL) for i in range(3)]

    kvs = raw.get_prefix(f"{prefix}tokens/slots/")
    assert sorted((meta["key"].decode(), int(meta["create_revision"])) for _, meta in kvs) == \
        [(f"{prefix}tokens/slots/{lease.slot}", lease.token) for lease in held]
    assert slot_keys(raw, prefix, "tokens") == [f"{prefix}tokens/slots/{i}" for i in range(3)]
    listed = backend.holders("tokens")
    assert [(h.slot, h.token, h.holder.task_id, h.handle) for h in listed] == \
        [(lease.slot, lease.token, f"h{i}", lease.handle) for i, lease in enumerate(held)]


def test_names_cannot_reach_into_each_others_keys(backend):
    assert backend.acquire("a", 1, holder("a"), TTL) is not None
    assert backend.acquire("a/slots", 1, holder("a/slots"), TTL) is not None
    assert backend.acquire("a/slots/1", 1, holder("deeper"), TTL) is not None
    assert [h.holder.task_id for h in backend.holders("a")] == ["a"]


# -- expiry is etcd's lease TTL --------------------------------------------------------

def test_a_short_ttl_rounds_up_to_etcds_minimum_and_etcd_deletes_the_key(make, raw, prefix):
    """TTL 1: the holder stops counting on it after 1 s, etcd (2 s minimum with
    its default settings, 500 ms sweep) deletes the key by itself, no acquirer needed."""
    backend, other = make(), make()
    lease = backend.acquire("short", 1, holder("dead"), 1)
    granted = time.monotonic()
    assert lease_ttl(raw, lease.handle) >= 1
    time.sleep(1.2)

    assert not lease.is_valid()
    assert slot_keys(raw, prefix, "short") == [f"{prefix}short/slots/0"]  # still etcd's
    assert other.acquire("short", 1, holder("early"), TTL) is None
    wait_until(lambda: not slot_keys(raw, prefix, "short"), 3, "etcd to delete the key")
    assert time.monotonic() - granted >= 1.5
    assert lease_ttl(raw, lease.handle) == -1
    assert other.acquire("short", 1, holder("after"), TTL) is not None


def test_validity_is_the_asked_ttl_and_keep_alives_hold_past_etcds_minimum(backend, raw):
    lease = backend.acquire("renewed", 1, holder("t"), 1)
    for _ in range(7):  # 2.8 s: past the 2 s etcd grants at least
        time.sleep(0.4)
        assert backend.renew(lease) is True
    assert lease.is_valid() and 0 < lease.remaining() <= 1
    assert backend.acquire("renewed", 1, holder("intruder"), TTL) is None
    [listed] = backend.holders("renewed")
    # Display: etcd's own count of what the lease has left (whole seconds).
    assert 0 <= (listed.expires_at - datetime.now(UTC)).total_seconds() <= 2.1


def test_renew_of_a_lease_whose_key_was_deleted_by_hand_is_false(backend, raw, prefix):
    lease = backend.acquire("by-hand", 1, holder("t"), TTL)
    raw.delete(f"{prefix}by-hand/slots/0")

    assert backend.renew(lease) is False
    assert lease_ttl(raw, lease.handle) == -1  # given back, not kept alive empty


def test_force_release_deletes_the_key_and_revokes_its_lease(backend, raw):
    keep = backend.acquire("forced", 2, holder("keep"), TTL)
    drop = backend.acquire("forced", 2, holder("drop"), TTL)

    assert backend.force_release("forced", drop.token) is True
    assert lease_ttl(raw, drop.handle) == -1
    assert lease_ttl(raw, keep.handle) > 0
    assert backend.renew(drop) is False


# -- processes ---------------------------------------------------------------------------

def _contend_in_child(backend: EtcdBackend, name: str, parent_client, now, peak,
                      rounds: int) -> None:
    # Forked with the parent's backend object, its client and pooled connections.
    assert backend._clients.get() is not parent_client
    assert backend._clients.get().session is not parent_client.session
    done = 0
    while done < rounds:
        lease = backend.acquire(name, 2, holder(f"p{os.getpid()}"), TTL)
        if lease is None:
            time.sleep(0.003)
            continue
        with now.get_lock():
            now.value += 1
            peak.value = max(peak.value, now.value)
        time.sleep(0.01)
        with now.get_lock():
            now.value -= 1
        backend.release(lease)
        done += 1


def test_forked_children_use_their_own_http_session(backend, lock_name):
    backend.release(backend.acquire(lock_name, 2, holder("parent"), TTL))
    parent_client = backend._clients.get()
    context = multiprocessing.get_context("fork")
    now, peak = context.Value("i", 0), context.Value("i", 0)
    children = [context.Process(target=_contend_in_child,
                                args=(backend, lock_name, parent_client, now, peak, 6))
                for _ in range(4)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)

    assert [child.exitcode for child in children] == [0] * 4
    assert 1 <= peak.value <= 2  # never over capacity (a loaded machine may not overlap)
    assert backend._clients.get() is parent_client  # the parent's client is untouched
    assert backend.holders(lock_name) == []


# -- a server that hangs ------------------------------------------------------------

def test_hung_server_raises_lock_error_after_the_timeout(make):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections (the kernel does), never answers
    try:
        backend = make(host="127.0.0.1", port=silent.getsockname()[1], timeout=0.5)
        started = time.monotonic()
        with pytest.raises(LockError) as caught:
            backend.acquire("hung", 1, holder("t"), TTL)
        assert time.monotonic() - started < 2
        assert "etcd http://127.0.0.1:" in str(caught.value)  # describe(), lock named
        assert "'hung'" in str(caught.value) and caught.value.__cause__ is not None
    finally:
        silent.close()
