"""The lock contract, one suite run against every backend on its real server."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from django_celery_adv.locks.backends.base import Holder, Lease
from tests.locks.contention import contend

TTL = 30


def holder(task_id: str) -> Holder:
    return Holder(task_id=task_id, hostname="contract-host", pid=4242)


def test_acquire_returns_a_lease_that_lists_its_holder(backend, lock_name):
    lease = backend.acquire(lock_name, 2, holder("t-1"), TTL)

    assert isinstance(lease, Lease)
    assert (lease.name, lease.slot, lease.backend) == (lock_name, 0, backend.alias)
    assert lease.is_valid()
    assert lease.acquired_at <= datetime.now(UTC) < lease.expires_at
    [listed] = backend.holders(lock_name)
    assert (listed.slot, listed.token) == (0, lease.token)
    assert listed.holder == Holder(task_id="t-1", hostname="contract-host", pid=4242)


def test_never_more_holders_than_capacity(backend, lock_name):
    leases = [backend.acquire(lock_name, 3, holder(f"t-{i}"), TTL) for i in range(3)]

    assert all(leases)
    assert sorted(lease.slot for lease in leases) == [0, 1, 2]
    assert backend.acquire(lock_name, 3, holder("t-4"), TTL) is None
    backend.release(leases[1])
    again = backend.acquire(lock_name, 3, holder("t-5"), TTL)
    assert again is not None and again.slot == 1
    assert [h.holder.task_id for h in backend.holders(lock_name)] == ["t-0", "t-5", "t-2"]


def test_capacity_zero_pauses_the_lock(backend, lock_name):
    assert backend.acquire(lock_name, 0, holder("t"), TTL) is None
    assert backend.holders(lock_name) == []


def test_tokens_strictly_increase_across_grants(backend, lock_name):
    tokens = []
    for i in range(5):
        lease = backend.acquire(lock_name, 1, holder(f"t-{i}"), TTL)
        tokens.append(lease.token)
        backend.release(lease)
    other = backend.acquire(lock_name, 2, holder("a"), TTL)
    tokens.append(other.token)
    tokens.append(backend.acquire(lock_name, 2, holder("b"), TTL).token)

    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)


def test_release_frees_the_slot(backend, lock_name):
    lease = backend.acquire(lock_name, 1, holder("t"), TTL)
    backend.release(lease)

    assert backend.holders(lock_name) == []
    assert backend.acquire(lock_name, 1, holder("u"), TTL) is not None


def test_renew_extends_a_held_lease(backend, lock_name):
    lease = backend.acquire(lock_name, 1, holder("t"), 5)
    before = lease.expires_at
    time.sleep(0.05)

    assert backend.renew(lease) is True
    assert lease.expires_at > before
    assert lease.is_valid()


def test_stale_holder_cannot_free_or_renew_the_new_holders_slot(backend, lock_name):
    stale = backend.acquire(lock_name, 1, holder("stale"), TTL)
    assert backend.force_release(lock_name, stale.token) is True
    fresh = backend.acquire(lock_name, 1, holder("fresh"), TTL)
    assert fresh is not None and fresh.token > stale.token

    backend.release(stale)
    assert backend.renew(stale) is False

    assert [h.token for h in backend.holders(lock_name)] == [fresh.token]
    assert backend.acquire(lock_name, 1, holder("third"), TTL) is None


def test_force_release_of_an_unknown_token_is_false(backend, lock_name):
    lease = backend.acquire(lock_name, 1, holder("t"), TTL)

    assert backend.force_release(lock_name, lease.token + 1_000_000) is False
    assert [h.token for h in backend.holders(lock_name)] == [lease.token]


def test_lowered_capacity_grants_nothing_until_below_it(backend, lock_name):
    held = [backend.acquire(lock_name, 3, holder(f"t-{i}"), TTL) for i in range(3)]
    assert all(held)

    assert backend.acquire(lock_name, 2, holder("new"), TTL) is None
    backend.release(held[0])
    assert backend.acquire(lock_name, 2, holder("new"), TTL) is None  # 2 held, capacity 2
    assert len(backend.holders(lock_name)) == 2  # holders keep theirs
    backend.release(held[2])
    granted = backend.acquire(lock_name, 2, holder("new"), TTL)
    assert granted is not None
    assert len(backend.holders(lock_name)) == 2


def test_expired_lease_is_reclaimed_and_reported_lost(ttl_backend, lock_name):
    backend = ttl_backend
    old = backend.acquire(lock_name, 1, holder("old"), 1)
    assert old is not None
    time.sleep(2.2)

    assert not old.is_valid()
    new = backend.acquire(lock_name, 1, holder("new"), TTL)
    assert new is not None and new.token > old.token
    assert backend.renew(old) is False
    backend.release(old)
    assert [h.holder.task_id for h in backend.holders(lock_name)] == ["new"]


def test_concurrent_acquirers_never_exceed_capacity(backend, lock_name):
    capacity, threads, rounds = 2, 8, 15
    seen = contend(backend, lock_name, capacity, threads=threads, rounds=rounds)

    assert not seen.errors, seen.errors[:3]
    assert seen.grants == threads * rounds
    assert 1 <= seen.peak <= capacity
    assert backend.holders(lock_name) == []
