"""EtcdBackend on the real etcd: the slot-key semaphore, its leases, faults.

The shared suite (test_contract.py) covers the contract; these tests cover what
is particular to etcd: slot keys and their etcd leases (none may leak), the
guard that serializes grants, expiry shorter than etcd's TTL granularity, and
a server that is down or hangs.
"""

from __future__ import annotations

import base64
import multiprocessing
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from django.conf import settings
from etcd3gw.client import Etcd3Client

from django_celery_adv.exceptions import LockError
from django_celery_adv.locks.backends.base import Holder
from django_celery_adv.locks.backends.etcd import EtcdBackend
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
    start = f"{prefix}{name}/slots/".encode()
    end = start[:-1] + bytes([start[-1] + 1])
    result = raw.post(raw.get_url("/kv/range"), json={
        "key": base64.b64encode(start).decode(), "range_end": base64.b64encode(end).decode()})
    return [base64.b64decode(kv["key"]).decode() for kv in result.get("kvs", [])]


def wait_for(predicate: Callable[[], object], timeout: float, step: float = 0.02) -> float:
    started = time.monotonic()
    while not predicate():
        elapsed = time.monotonic() - started
        assert elapsed < timeout, f"condition not met within {timeout}s"
        time.sleep(step)
    return time.monotonic() - started


# -- capacity under contention, and no leaked etcd lease --------------------------

def test_sixteen_threads_never_exceed_capacity_and_leak_no_lease(backend, raw):
    capacity, threads, rounds = 3, 16, 10
    client = backend._client()
    granted: list[int] = []
    grant = client.lease

    def recording_grant(ttl):
        lease = grant(ttl)
        granted.append(lease.id)
        return lease

    client.lease = recording_grant
    seen = contend(backend, "sixteen", capacity, threads=threads, rounds=rounds, hold=0.01)

    assert not seen.errors, seen.errors[:3]
    assert seen.grants == threads * rounds
    assert 2 <= seen.peak <= capacity  # shared, never over capacity
    assert backend.holders("sixteen") == []
    # Grants that lost a race were revoked too, not left to expire.
    assert len(granted) >= threads * rounds
    assert {lease_ttl(raw, lease_id) for lease_id in granted} == {-1}


def _contend_in_child(backend: EtcdBackend, now, peak, rounds: int) -> None:
    # Forked with the parent's backend object and its pooled connections.
    done = 0
    while done < rounds:
        lease = backend.acquire("eight", 2, holder(f"p{os.getpid()}"), TTL)
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
    assert backend._pid == os.getpid()


def test_eight_forked_processes_never_exceed_capacity(backend):
    backend.release(backend.acquire("eight", 2, holder("parent"), TTL))
    parent_client = backend._client()
    context = multiprocessing.get_context("fork")
    now, peak = context.Value("i", 0), context.Value("i", 0)
    children = [context.Process(target=_contend_in_child, args=(backend, now, peak, 8))
                for _ in range(8)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)

    assert [child.exitcode for child in children] == [0] * 8
    assert peak.value == 2
    assert backend.holders("eight") == []
    assert backend._client() is parent_client  # the parent's client is untouched


# -- tokens, holders -------------------------------------------------------------------

def test_tokens_are_revisions_that_grow_and_name_the_slot_key(backend, raw, prefix):
    tokens = []
    for capacity in (1, 3, 2, 1):
        lease = backend.acquire("tokens", capacity, holder(f"c{capacity}"), TTL)
        tokens.append(lease.token)
        backend.release(lease)
    raw.put("/celery-adv-test/unrelated", "moves the revision on")
    held = [backend.acquire("tokens", 3, holder(f"h{i}"), TTL) for i in range(3)]
    tokens.extend(lease.token for lease in held)

    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    listed = backend.holders("tokens")
    assert [(h.slot, h.token, h.holder.task_id) for h in listed] == \
        [(lease.slot, lease.token, f"h{i}") for i, lease in enumerate(held)]
    assert slot_keys(raw, prefix, "tokens") == [f"{prefix}tokens/slots/{i}" for i in range(3)]


def test_names_cannot_reach_into_each_others_keys(backend):
    assert backend.acquire("a", 1, holder("a"), TTL) is not None
    assert backend.acquire("a/slots", 1, holder("a/slots"), TTL) is not None
    assert backend.acquire("a/slots/1", 1, holder("deeper"), TTL) is not None
    assert [h.holder.task_id for h in backend.holders("a")] == ["a"]


# -- expiry, loss, stale holders --------------------------------------------------------

def test_unrenewed_lease_frees_its_slot_within_its_ttl(make, raw, prefix):
    dead, other = make(), make()
    lease = dead.acquire("crash", 1, holder("dead"), 1.5)
    acquired = time.monotonic()
    assert other.acquire("crash", 1, holder("early"), TTL) is None
    time.sleep(1.0)
    assert other.acquire("crash", 1, holder("early"), TTL) is None  # not before its TTL

    wait_for(lambda: other.acquire("crash", 1, holder("after"), TTL), 2)
    assert time.monotonic() - acquired <= 1.5 + 0.3
    # The dead holder's etcd lease was revoked by the grant that took its slot.
    assert lease_ttl(raw, lease.handle) == -1
    [listed] = other.holders("crash")
    assert listed.holder.task_id == "after" and listed.token > lease.token


def test_etcd_removes_an_unrenewed_slot_key_even_without_acquirers(backend, raw, prefix):
    lease = backend.acquire("alone", 2, holder("alone"), 1)
    assert slot_keys(raw, prefix, "alone") == [f"{prefix}alone/slots/0"]

    # etcd's minimum lease TTL (2 s) and its 500 ms expiry sweep.
    wait_for(lambda: not slot_keys(raw, prefix, "alone"), 4)
    assert lease_ttl(raw, lease.handle) == -1
    assert backend.renew(lease) is False


def test_renew_after_the_slot_was_reclaimed_is_false_and_release_spares_the_new_holder(make,
                                                                                       raw):
    old_backend, new_backend = make(), make()
    old = old_backend.acquire("reclaimed", 1, holder("old"), 1)
    time.sleep(1.1)
    new = new_backend.acquire("reclaimed", 1, holder("new"), TTL)
    assert new is not None and new.token > old.token

    assert old_backend.renew(old) is False
    old_backend.release(old)
    assert new_backend.renew(new) is True
    assert lease_ttl(raw, new.handle) > 0
    assert [h.token for h in new_backend.holders("reclaimed")] == [new.token]
    assert old_backend.acquire("reclaimed", 1, holder("third"), TTL) is None


def test_renew_keeps_a_lease_past_its_first_ttl(backend):
    lease = backend.acquire("renewed", 1, holder("t"), 1)
    for _ in range(4):
        time.sleep(0.4)
        assert backend.renew(lease) is True
    assert lease.is_valid()
    assert backend.acquire("renewed", 1, holder("intruder"), TTL) is None
    [listed] = backend.holders("renewed")
    assert abs((listed.expires_at - lease.expires_at).total_seconds()) < 0.001


# -- capacity changes, force_release ---------------------------------------------------

def test_lowered_capacity_while_three_are_held(backend):
    held = [backend.acquire("lowered", 3, holder(f"t{i}"), TTL) for i in range(3)]
    assert all(held)

    assert backend.acquire("lowered", 2, holder("new"), TTL) is None
    assert backend.acquire("lowered", 1, holder("new"), TTL) is None
    backend.release(held[0])
    assert backend.acquire("lowered", 2, holder("new"), TTL) is None
    assert all(backend.renew(lease) for lease in held[1:])  # holders keep theirs
    backend.release(held[1])
    granted = backend.acquire("lowered", 2, holder("new"), TTL)

    assert granted is not None and granted.slot == 0
    assert [(h.slot, h.holder.task_id) for h in backend.holders("lowered")] == \
        [(0, "new"), (2, "t2")]
    assert backend.acquire("lowered", 2, holder("more"), TTL) is None


def test_force_release_deletes_the_key_and_revokes_its_lease(backend, raw):
    keep = backend.acquire("forced", 2, holder("keep"), TTL)
    drop = backend.acquire("forced", 2, holder("drop"), TTL)

    assert backend.force_release("forced", drop.token + 10_000) is False
    assert backend.force_release("forced", drop.token) is True
    assert backend.force_release("forced", drop.token) is False
    assert lease_ttl(raw, drop.handle) == -1
    assert backend.renew(drop) is False
    assert backend.renew(keep) is True
    assert [h.token for h in backend.holders("forced")] == [keep.token]


# -- a server that is down or hangs --------------------------------------------------

def test_unreachable_server_raises_lock_error_at_once(make):
    backend = make(host="127.0.0.1", port=1)
    started = time.monotonic()
    with pytest.raises(LockError) as caught:
        backend.acquire("down", 1, holder("t"), TTL)

    assert time.monotonic() - started < 2
    assert caught.value.__cause__ is not None
    with pytest.raises(LockError):
        backend.holders("down")


def test_hung_server_raises_lock_error_after_the_timeout(make):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections (the kernel does), never answers
    try:
        backend = make(host="127.0.0.1", port=silent.getsockname()[1], timeout=0.5)
        started = time.monotonic()
        with pytest.raises(LockError):
            backend.acquire("hung", 1, holder("t"), TTL)
        assert time.monotonic() - started < 2
    finally:
        silent.close()
