"""RedisBackend on the real Redis of the test settings, beyond the shared contract.

Only what is specific to Redis lives here: the keys and record the scripts
write, the server's clock, validity from the local monotonic clock, a foreign
key, the per-process client across fork. The contract (slots, capacity 0,
tokens, renew, stale release, lowered capacity, force release, holders,
``describe()``) is in test_contract.py; faults are in test_redis_faults.py.
Every test uses its own key prefix and deletes the keys under it afterwards.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
import redis
from django.conf import settings

from django_celery_adv.exceptions import InvalidLockBackendError, LockError
from django_celery_adv.locks.backends.base import Holder
from django_celery_adv.locks.backends.redis import IDLE_MS, RedisBackend

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


def test_record_round_trips_every_field(backend, raw, name, prefix):
    lease = backend.acquire(name, 2, holder("task-1"), 12.5)

    assert (lease.ttl, lease.backend, lease.name) == (12.5, "redis", name)
    assert (lease.expires_at - lease.acquired_at).total_seconds() == pytest.approx(12.5)
    [listed] = backend.holders(name)
    assert listed.holder == Holder(task_id="task-1", hostname="redis-test-host", pid=31337)
    assert (listed.token, listed.acquired_at, listed.expires_at, listed.ttl) == (
        lease.token, lease.acquired_at, lease.expires_at, 12.5)
    # Each grant records the random id of the request that made it (to
    # withdraw a grant whose reply was lost); no two requests share one.
    other = backend.acquire(name, 2, holder("task-2"), 12.5)
    records = raw.hgetall(f"{prefix}{{{name}}}:slots")
    requests = [records[str(lease.slot)].split(":")[4], records[str(other.slot)].split(":")[4]]
    assert all(len(request) == 32 for request in requests) and requests[0] != requests[1]


def test_expiry_is_judged_by_the_server_clock(backend, raw, name):
    seconds, micros = raw.time()
    lease = backend.acquire(name, 1, holder("t"), TTL)

    server_now = datetime.fromtimestamp(seconds + micros / 1e6, UTC)
    assert abs((lease.acquired_at - server_now).total_seconds()) < 1


def test_validity_runs_from_before_the_request_on_the_monotonic_clock(backend, name):
    before = time.monotonic()
    lease = backend.acquire(name, 1, holder("t"), 5)
    after = time.monotonic()
    assert before + 5 <= lease.valid_until <= after + 5

    time.sleep(0.05)
    before = time.monotonic()
    assert backend.renew(lease) is True
    assert before + 5 <= lease.valid_until <= time.monotonic() + 5


def test_keys_share_a_hash_tag_and_the_counter_never_expires(backend, raw, name, prefix):
    backend.acquire(name, 1, holder("t"), 2)

    slots, token = f"{prefix}{{{name}}}:slots", f"{prefix}{{{name}}}:token"
    assert sorted(raw.keys(f"{prefix}*")) == sorted([slots, token])
    assert 2000 < raw.pttl(slots) <= 2000 + IDLE_MS
    assert raw.pttl(token) == -1  # no TTL: tokens must never go backwards


def test_renew_keeps_the_hash_alive_past_the_lease(backend, raw, name, prefix):
    lease = backend.acquire(name, 1, holder("t"), 1)
    lease.ttl = 120

    assert backend.renew(lease) is True
    [listed] = backend.holders(name)
    assert (listed.expires_at, listed.ttl) == (lease.expires_at, 120)
    assert raw.pttl(f"{prefix}{{{name}}}:slots") > 120_000


def test_expired_record_stays_until_an_acquire_reclaims_it(backend, raw, name, prefix):
    old = backend.acquire(name, 1, holder("old"), 0.5)
    time.sleep(0.7)

    assert backend.holders(name) == []
    assert raw.hlen(f"{prefix}{{{name}}}:slots") == 1  # stored, no longer live
    new = backend.acquire(name, 1, holder("new"), TTL)
    assert (new.slot, new.token) == (0, old.token + 1)
    assert raw.hlen(f"{prefix}{{{name}}}:slots") == 1


def test_foreign_key_type_raises_lock_error(backend, raw, name, prefix):
    raw.set(f"{prefix}{{{name}}}:slots", "not a hash")

    with pytest.raises(LockError) as info:
        backend.acquire(name, 1, holder("t"), TTL)
    assert isinstance(info.value.__cause__, redis.ResponseError)
    assert raw.get(f"{prefix}{{{name}}}:slots") == "not a hash"  # a script error is no grant


def test_url_is_required():
    with pytest.raises(InvalidLockBackendError):
        RedisBackend("r", {})
    assert RedisBackend.required_options == ("url",)


def test_client_is_made_lazily_once_per_process_and_closed(backend, name):
    assert backend._client.peek() is None
    backend.holders(name)
    client = backend._client.peek()
    backend.acquire(name, 1, holder("t"), TTL)
    assert backend._client.peek() is client

    backend.close()
    assert backend._client.peek() is None
    assert backend.holders(name)[0].holder.task_id == "t"  # a new client on demand


def _child(backend: RedisBackend, name: str, parent_client: object, results) -> None:
    """Body of a forked process: take and give back a slot, report the client used."""
    lease = backend.acquire(name, 2, holder(f"p{os.getpid()}"), TTL)
    backend.release(lease)
    results.put((lease.slot, backend._client.peek() is not parent_client))


def test_forked_children_make_their_own_client(backend, name):
    held = backend.acquire(name, 2, holder("parent"), TTL)
    parent_client = backend._client.peek()
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(backend, name, parent_client, results))
             for _ in range(3)]
    for proc in procs:
        proc.start()
        proc.join(30)

    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    assert [results.get(timeout=5) for _ in procs] == [(1, True)] * 3
    # The children's clients did not close the parent's sockets.
    assert backend._client.peek() is parent_client
    assert backend.renew(held) is True
    assert [h.holder.task_id for h in backend.holders(name)] == ["parent"]
