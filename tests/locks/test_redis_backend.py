"""RedisBackend on the real Redis of the test settings (db 12), beyond the shared contract.

Every test uses its own key prefix and deletes the keys under it afterwards.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
import redis
from django.conf import settings

from django_celery_adv.exceptions import InvalidLockBackendError, LockError
from django_celery_adv.locks.backends.base import Holder, Lease
from django_celery_adv.locks.backends.redis import IDLE_MS, RedisBackend
from tests.locks.contention import contend

TTL = 30


def holder(task_id: str) -> Holder:
    return Holder(task_id=task_id, hostname="redis-test-host", pid=31337)


@pytest.fixture
def prefix() -> Iterator[str]:
    value = f"celery-adv-test:lock:{uuid.uuid4().hex[:12]}:"
    yield value
    client = redis.Redis.from_url(settings.REDIS_LOCK_URL)
    keys = list(client.scan_iter(match=f"{value}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def raw(prefix) -> Iterator[redis.Redis]:
    """A plain client on the same database, to look at the keys directly."""
    client = redis.Redis.from_url(settings.REDIS_LOCK_URL, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def make(prefix) -> Iterator[Callable[..., RedisBackend]]:
    made: list[RedisBackend] = []

    def build(**options) -> RedisBackend:
        backend = RedisBackend("redis", {"url": settings.REDIS_LOCK_URL, "prefix": prefix,
                                         **options})
        made.append(backend)
        return backend

    yield build
    for backend in made:
        backend.close()


@pytest.fixture
def backend(make) -> RedisBackend:
    return make()


@pytest.fixture
def name() -> str:
    return f"lock-{uuid.uuid4().hex[:8]}"


def test_grants_lowest_free_slots_up_to_capacity(backend, name):
    leases = [backend.acquire(name, 3, holder(f"t{i}"), TTL) for i in range(3)]

    assert [lease.slot for lease in leases] == [0, 1, 2]
    assert backend.acquire(name, 3, holder("t3"), TTL) is None
    backend.release(leases[1])
    again = backend.acquire(name, 3, holder("t4"), TTL)
    assert again.slot == 1
    assert [(h.slot, h.holder.task_id) for h in backend.holders(name)] == [
        (0, "t0"), (1, "t4"), (2, "t2")]


def test_lease_fields_and_holders_identity(backend, name):
    lease = backend.acquire(name, 2, holder("task-1"), 12.5)

    assert (lease.ttl, lease.backend, lease.name) == (12.5, "redis", name)
    assert (lease.expires_at - lease.acquired_at).total_seconds() == pytest.approx(12.5)
    [listed] = backend.holders(name)
    assert listed.holder == Holder(task_id="task-1", hostname="redis-test-host", pid=31337)
    assert (listed.token, listed.acquired_at, listed.expires_at, listed.ttl) == (
        lease.token, lease.acquired_at, lease.expires_at, 12.5)


def test_expiry_is_judged_by_the_server_clock(backend, raw, name):
    seconds, micros = raw.time()
    lease = backend.acquire(name, 1, holder("t"), TTL)

    server_now = datetime.fromtimestamp(seconds + micros / 1e6, UTC)
    assert abs((lease.acquired_at - server_now).total_seconds()) < 1


def test_capacity_zero_grants_nothing(backend, raw, name, prefix):
    assert backend.acquire(name, 0, holder("t"), TTL) is None
    assert backend.holders(name) == []
    assert raw.keys(f"{prefix}*") == []


def test_tokens_strictly_increase(make, name):
    first, second = make(), make()  # two clients, one counter
    tokens = []
    for i in range(10):
        backend = first if i % 2 else second
        lease = backend.acquire(name, 4, holder(f"t{i}"), TTL)
        tokens.append(lease.token)
        if i % 3:  # keep every third: grants into fresh and into reused slots
            backend.release(lease)

    assert tokens == sorted(set(tokens))  # strictly increasing


def test_keys_share_a_hash_tag_and_the_counter_never_expires(backend, raw, name, prefix):
    backend.acquire(name, 1, holder("t"), 2)

    slots, token = f"{prefix}{{{name}}}:slots", f"{prefix}{{{name}}}:token"
    assert sorted(raw.keys(f"{prefix}*")) == sorted([slots, token])
    assert 2000 < raw.pttl(slots) <= 2000 + IDLE_MS
    assert raw.pttl(token) == -1  # no TTL: tokens must never go backwards


def test_renew_extends_a_live_lease(backend, raw, name, prefix):
    lease = backend.acquire(name, 1, holder("t"), 1)
    before = lease.expires_at
    lease.ttl = 120
    time.sleep(0.05)

    assert backend.renew(lease) is True
    assert (lease.expires_at - before).total_seconds() > 100
    [listed] = backend.holders(name)
    assert (listed.expires_at, listed.ttl) == (lease.expires_at, 120)
    assert raw.pttl(f"{prefix}{{{name}}}:slots") > 120_000  # the hash outlives the lease


def test_expired_lease_is_reclaimed_by_acquire(backend, raw, name, prefix):
    old = backend.acquire(name, 1, holder("old"), 1)
    assert backend.acquire(name, 1, holder("new"), TTL) is None
    time.sleep(1.2)

    assert backend.holders(name) == []
    assert raw.hlen(f"{prefix}{{{name}}}:slots") == 1  # still stored, no longer live
    new = backend.acquire(name, 1, holder("new"), TTL)
    assert (new.slot, new.token > old.token) == (0, True)
    assert raw.hlen(f"{prefix}{{{name}}}:slots") == 1


def test_renew_of_an_expired_lease_fails_and_does_not_resurrect(backend, name):
    lease = backend.acquire(name, 1, holder("t"), 0.5)
    time.sleep(0.8)

    assert backend.renew(lease) is False
    assert backend.holders(name) == []
    assert backend.acquire(name, 1, holder("u"), TTL) is not None


def test_stale_release_does_not_free_the_new_holders_slot(backend, name):
    stale = backend.acquire(name, 1, holder("stale"), 0.5)
    time.sleep(0.8)
    fresh = backend.acquire(name, 1, holder("fresh"), TTL)
    assert (fresh.slot, stale.slot) == (0, 0)

    backend.release(stale)
    assert backend.renew(stale) is False
    assert [h.token for h in backend.holders(name)] == [fresh.token]
    assert backend.acquire(name, 1, holder("third"), TTL) is None
    assert backend.renew(fresh) is True


def test_capacity_lowered_while_three_are_held(backend, name):
    held = [backend.acquire(name, 3, holder(f"t{i}"), TTL) for i in range(3)]

    assert backend.acquire(name, 2, holder("new"), TTL) is None
    backend.release(held[0])
    assert backend.acquire(name, 2, holder("new"), TTL) is None  # 2 live, capacity 2
    assert backend.renew(held[2]) is True  # holders above capacity keep theirs
    backend.release(held[1])
    granted = backend.acquire(name, 2, holder("new"), TTL)
    assert granted.slot == 0
    assert [h.slot for h in backend.holders(name)] == [0, 2]
    assert backend.acquire(name, 2, holder("more"), TTL) is None
    assert backend.acquire(name, 1, holder("more"), TTL) is None


def test_force_release(backend, name):
    first = backend.acquire(name, 2, holder("a"), TTL)
    second = backend.acquire(name, 2, holder("b"), TTL)

    assert backend.force_release(name, first.token) is True
    assert backend.force_release(name, first.token) is False
    assert backend.force_release(name, second.token + 1000) is False
    assert [h.token for h in backend.holders(name)] == [second.token]
    assert backend.renew(first) is False
    assert backend.acquire(name, 2, holder("c"), TTL).slot == 0


def test_force_release_ignores_an_expired_lease(backend, name):
    lease = backend.acquire(name, 1, holder("a"), 0.3)
    time.sleep(0.5)

    assert backend.force_release(name, lease.token) is False


def test_server_down_raises_lock_error():
    backend = RedisBackend("down", {"url": "redis://127.0.0.1:1/0"})
    lease = Lease(name="x", slot=0, token=1, holder=holder("t"), acquired_at=datetime.now(UTC),
                  expires_at=datetime.now(UTC), backend="down")
    calls = [lambda: backend.acquire("x", 1, holder("t"), TTL), lambda: backend.renew(lease),
             lambda: backend.release(lease), lambda: backend.holders("x"),
             lambda: backend.force_release("x", 1)]

    for call in calls:
        started = time.monotonic()
        with pytest.raises(LockError) as info:
            call()
        assert isinstance(info.value.__cause__, redis.ConnectionError)
        assert time.monotonic() - started < 2


def test_foreign_key_type_raises_lock_error(backend, raw, name, prefix):
    raw.set(f"{prefix}{{{name}}}:slots", "not a hash")

    with pytest.raises(LockError) as info:
        backend.acquire(name, 1, holder("t"), TTL)
    assert isinstance(info.value.__cause__, redis.ResponseError)


def test_describe_masks_passwords(prefix):
    for url, shown in [
        ("redis://:s3cret@127.0.0.1:6379/12", "redis://:****@127.0.0.1:6379/12"),
        ("redis://user:s3cret@host:6379/0", "redis://user:****@host:6379/0"),
        ("rediss://host:6380/0?password=s3cret&ssl_cert_reqs=none",
         "rediss://host:6380/0?password=****&ssl_cert_reqs=none"),
        ("redis://127.0.0.1:6379/12", "redis://127.0.0.1:6379/12"),
    ]:
        text = RedisBackend("r", {"url": url, "prefix": prefix}).describe()
        assert "s3cret" not in text
        assert shown in text and prefix in text


def test_url_is_required():
    with pytest.raises(InvalidLockBackendError):
        RedisBackend("r", {})
    assert RedisBackend.required_options == ("url",)


def test_client_is_created_lazily_and_once_per_process(backend, name):
    assert backend._conn is None
    backend.holders(name)
    conn = backend._conn
    backend.acquire(name, 1, holder("t"), TTL)
    assert backend._conn is conn and conn.pid == os.getpid()


def test_sixteen_threads_never_exceed_capacity(backend, name):
    capacity, threads = 3, 16
    seen = contend(backend, name, capacity, threads=threads, attempts=40, seconds=3,
                   idle=0.001)

    assert not seen.errors, seen.errors[:3]
    assert seen.over == 0 and seen.peak <= capacity
    assert seen.peak >= 2  # the threads did contend
    assert seen.grants > threads
    assert len(set(seen.tokens)) == len(seen.tokens)  # every grant had its own token
    assert backend.holders(name) == []


def _hammer(backend: RedisBackend, name: str, capacity: int, rounds: int, active, over,
            peak, results) -> None:
    """Body of one forked process: acquire, count, release, report."""
    tokens, stale_client = [], backend._conn.client
    for _ in range(rounds):
        lease = backend.acquire(name, capacity, holder(f"p{os.getpid()}"), TTL)
        if lease is None:
            time.sleep(0.001)
            continue
        with active.get_lock():
            active.value += 1
            if active.value > capacity:
                over.value += 1
            peak.value = max(peak.value, active.value)
        tokens.append(lease.token)
        time.sleep(0.002)
        with active.get_lock():
            active.value -= 1
        backend.release(lease)
    conn = backend._conn
    results.put((os.getpid(), tokens, conn.pid == os.getpid(), conn.client is not stale_client))


def test_eight_processes_never_exceed_capacity(backend, name):
    capacity, processes, rounds = 3, 8, 60
    backend.holders(name)  # the parent's client exists before the fork
    ctx = multiprocessing.get_context("fork")
    active, over, peak = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0)
    results = ctx.Queue()
    procs = [ctx.Process(target=_hammer,
                         args=(backend, name, capacity, rounds, active, over, peak, results))
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    reports = []
    for _ in procs:
        try:
            reports.append(results.get(timeout=60))
        except queue.Empty:
            break
    for proc in procs:
        proc.join(30)

    assert [proc.exitcode for proc in procs] == [0] * processes
    assert len(reports) == processes
    assert all(own_pid and fresh for _, _, own_pid, fresh in reports)  # no client across fork
    assert over.value == 0 and peak.value <= capacity
    assert peak.value >= 2
    tokens = [token for _, got, _, _ in reports for token in got]
    assert len(tokens) > processes and len(set(tokens)) == len(tokens)
    for _, got, _, _ in reports:
        assert got == sorted(got)  # each process sees its tokens increase
    assert backend.holders(name) == []
    assert backend._conn.pid == os.getpid()  # the parent's client survived the children
