"""ZooKeeperBackend on the real ZooKeeper: what only ZooKeeper has.

The contract (slots, capacity 0, tokens, renew, stale release, lowered
capacity, force release, holders' fields) is in test_contract.py, faults (a
server that stops answering, SIGSTOP, fork, a lost reply, a moved clock) in
test_zookeeper_faults.py. Here: one kazoo ``Semaphore`` path shared with plain
kazoo clients (count, holders, its stored ``max_leases``), tokens that are
``czxid``s, validity bounded by the session, session expiry, and no node churn
while waiters poll a full lock.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from django.conf import settings
from kazoo.client import KazooClient
from kazoo.recipe.lock import Semaphore

from django_celery_adv.locks.backends.base import Holder, Lease
from django_celery_adv.locks.backends.zookeeper import ZooKeeperBackend

#: The server's minimum (2 ticks of 2 s): keeps the session tests short.
SESSION_TIMEOUT = 4.0
#: ZooKeeper expires sessions in buckets of one tick.
TICK = 2.0
TTL = 30
T = TypeVar("T")


def holder(task_id: str) -> Holder:
    return Holder(task_id=task_id, hostname="zk-test-host", pid=4242)


def wait_for(predicate: Callable[[], T], timeout: float, step: float = 0.02) -> T:
    """The first true value of ``predicate()``; fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"condition not met within {timeout}s"
        time.sleep(step)
    return value


def session_of(backend: ZooKeeperBackend) -> int:
    return backend._client().client_id[0]


@pytest.fixture
def root() -> str:
    return f"/celery-adv-test/zk-backend-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make(root: str) -> Iterator[Callable[..., ZooKeeperBackend]]:
    """Backends with a short session, each with its own ZooKeeper session."""
    made: list[ZooKeeperBackend] = []

    def make(**options) -> ZooKeeperBackend:
        options = {"hosts": settings.ZOOKEEPER_HOSTS, "root": root,
                   "timeout": SESSION_TIMEOUT, **options}
        made.append(ZooKeeperBackend("zookeeper", options))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def backend(make) -> ZooKeeperBackend:
    return make()


@pytest.fixture
def raw_zk() -> Iterator[KazooClient]:
    clients: list[KazooClient] = []

    def connect() -> KazooClient:
        client = KazooClient(hosts=settings.ZOOKEEPER_HOSTS)
        client.start(timeout=5)
        clients.append(client)
        return client

    yield connect()
    for client in clients:
        client.stop()
        client.close()


def leases_on_server(raw_zk: KazooClient, path: str) -> dict[int, dict]:
    """czxid -> data of every lease node under a Semaphore path, read by plain kazoo."""
    nodes = {}
    for child in raw_zk.get_children(path):
        data, stat = raw_zk.get(f"{path}/{child}")
        nodes[stat.czxid] = json.loads(data) if data.startswith(b"{") else data.decode()
    return nodes


# -- one kazoo Semaphore, shared with plain kazoo clients ------------------------

def test_tokens_are_czxids_and_any_kazoo_client_lists_the_holders(backend, raw_zk, root):
    path = f"{root}/listed/semaphore"
    a = backend.acquire("listed", 3, Holder(task_id="a", hostname="h1", pid=11), TTL)
    b = backend.acquire("listed", 3, Holder(task_id="b", hostname="h2", pid=22), TTL)
    foreign = Semaphore(raw_zk, path, "plain-kazoo", max_leases=3)
    assert foreign.acquire(blocking=False) is True

    identifiers = Semaphore(raw_zk, path, max_leases=3).lease_holders()
    assert "plain-kazoo" in identifiers
    assert sorted((json.loads(i) for i in identifiers if i != "plain-kazoo"),
                  key=lambda data: data["slot"]) == [
        {"task_id": "a", "hostname": "h1", "pid": 11, "slot": 0, "ttl": TTL},
        {"task_id": "b", "hostname": "h2", "pid": 22, "slot": 1, "ttl": TTL}]
    on_server = leases_on_server(raw_zk, path)
    assert on_server[a.token]["task_id"] == "a" and on_server[b.token]["task_id"] == "b"
    # The plain client's lease counts and is listed on the free slot.
    assert backend.acquire("listed", 3, holder("full"), TTL) is None
    assert [(h.slot, h.holder.task_id, h.holder.hostname) for h in backend.holders("listed")] \
        == [(0, "a", "h1"), (1, "b", "h2"), (2, None, "plain-kazoo")]
    assert [h.token for h in backend.holders("listed")][:2] == [a.token, b.token]


def _hammer(acquire: Callable[[], Callable[[], None] | None], stop: threading.Event,
            live: list[int], peak: list[int], grants: list[int], mu: threading.Lock) -> None:
    while not stop.is_set():
        release = acquire()
        if release is None:
            time.sleep(0.002)
            continue
        with mu:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            grants[0] += 1
        time.sleep(0.004)
        with mu:
            live[0] -= 1
        release()


@pytest.mark.parametrize("capacity", [1, 2])
def test_ours_and_plain_kazoo_semaphores_never_exceed_capacity_together(make, raw_zk, root,
                                                                        capacity):
    path = f"{root}/shared/semaphore"
    mu, stop = threading.Lock(), threading.Event()
    live, peak = [0], [0]
    ours_granted, theirs_granted = [0], [0]

    def ours(backend: ZooKeeperBackend) -> Callable[[], Callable[[], None] | None]:
        def acquire():
            lease = backend.acquire("shared", capacity, holder("ours"), TTL)
            return None if lease is None else (lambda: backend.release(lease))
        return acquire

    def theirs(client: KazooClient, blocking: bool) -> Callable[[], Callable[[], None] | None]:
        def acquire():
            semaphore = Semaphore(client, path, "plain-kazoo", max_leases=capacity)
            try:
                gotten = semaphore.acquire(blocking=blocking, timeout=0.2 if blocking else None)
            except Exception:  # LockTimeout of a blocking wait: try again
                gotten = False
            return semaphore.release if gotten else None
        return acquire

    plain = [KazooClient(hosts=settings.ZOOKEEPER_HOSTS) for _ in range(2)]
    for client in plain:
        client.start(timeout=5)
    workers = [(ours(make()), ours_granted), (ours(make()), ours_granted),
               (theirs(plain[0], False), theirs_granted), (theirs(plain[1], True), theirs_granted)]
    threads = [threading.Thread(target=_hammer, args=(acquire, stop, live, peak, grants, mu))
               for acquire, grants in workers]
    try:
        for thread in threads:
            thread.start()
        time.sleep(2.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        for client in plain:
            client.stop()
            client.close()

    print(f"capacity {capacity}: peak {peak[0]}, grants ours {ours_granted[0]}, "
          f"plain kazoo {theirs_granted[0]}")
    assert peak[0] <= capacity
    assert ours_granted[0] > 0 and theirs_granted[0] > 0
    assert raw_zk.get_children(path) == []


def test_capacity_changes_rewrite_the_stored_max_leases(make, raw_zk, root):
    backend, other = make(), make()
    path = f"{root}/change/semaphore"
    three = [other.acquire("change", 3, holder(f"s{i}"), TTL) for i in range(3)]
    assert all(three) and raw_zk.get(path)[0] == b"3"

    # 3 -> 2: kazoo refuses a Semaphore whose max_leases differs from the stored
    # one; the backend stores the new capacity and counts with it.
    assert backend.acquire("change", 2, holder("two"), TTL) is None  # 3 held
    other.release(three[0])
    assert backend.acquire("change", 2, holder("two"), TTL) is None  # 2 held
    other.release(three[1])
    # A count found full is kept until the watch reports the change: a poll
    # sees a release by another session once its event has arrived.
    two = wait_for(lambda: backend.acquire("change", 2, holder("two"), TTL), 2)
    assert two is not None and two.slot == 0
    assert raw_zk.get(path)[0] == b"2"
    # A plain kazoo client with the new capacity shares the count ...
    assert Semaphore(raw_zk, path, "plain", max_leases=2).acquire(blocking=False) is False
    # ... and one with the old capacity is refused by kazoo's own check.
    with pytest.raises(ValueError):
        Semaphore(raw_zk, path, "plain", max_leases=3).acquire(blocking=False)
    # The other process still believes 3 is stored: it counts with its capacity.
    assert other.acquire("change", 2, holder("late"), TTL) is None
    assert other.acquire("change", 3, holder("three-again"), TTL) is not None

    # Down to 1 while 3 are held: nothing until they are all gone.
    assert backend.acquire("change", 1, holder("one"), TTL) is None
    for lease in backend.holders("change"):
        assert backend.force_release("change", lease.token)
    one = backend.acquire("change", 1, holder("one"), TTL)
    assert one is not None and raw_zk.get(path)[0] == b"1"


# -- validity and session ----------------------------------------------------------

def test_validity_is_bounded_by_the_session_not_the_lock_ttl(backend):
    sent_at = time.monotonic()
    lease = backend.acquire("valid", 1, holder("t"), 600)

    assert lease.is_valid()
    # Valid until the server could have expired the session, counted from
    # before the request was sent; never 600 s.
    assert sent_at < lease.valid_until <= sent_at + SESSION_TIMEOUT
    time.sleep(0.2)
    renewed_at = time.monotonic()
    assert backend.renew(lease) is True
    assert renewed_at < lease.valid_until <= renewed_at + SESSION_TIMEOUT + 0.1


def test_expired_session_reports_its_leases_lost_from_a_thread_of_ours(make):
    backend, other = make(), make()
    lost: list[tuple[Lease, str]] = []
    first = backend.acquire("session", 2, holder("first"), TTL)
    second = backend.acquire("session", 2, holder("second"), TTL)
    for lease in (first, second):
        lease.on_lost = lambda lease: lost.append((lease, threading.current_thread().name))
    session_id, password = backend._client().client_id

    # kazoo's own test trick: a second connection with the same session id,
    # closed, ends the session on the server.
    thief = KazooClient(hosts=settings.ZOOKEEPER_HOSTS, client_id=(session_id, password))
    thief.start(timeout=5)
    thief.stop()
    thief.close()

    wait_for(lambda: len(lost) == 2, 10)
    assert {id(lease) for lease, _ in lost} == {id(first), id(second)}
    # Called from a thread of its own, never from kazoo's connection thread.
    assert all(name.startswith("zookeeper-lock-lost") for _, name in lost), lost
    assert first.lost and not first.is_valid()
    assert backend.renew(first) is False
    fresh = other.acquire("session", 2, holder("fresh"), TTL)
    assert fresh is not None and fresh.token > second.token
    backend.release(first)  # lost with its session: frees nothing
    assert [h.holder.task_id for h in other.holders("session")] == ["fresh"]
    wait_for(lambda: backend._client().connected, 5)  # a new session, still usable
    assert session_of(backend) != session_id
    assert backend.acquire("session", 2, holder("again"), TTL) is not None


# -- polling a full lock -------------------------------------------------------------

def nodes_created(raw_zk: KazooClient, base: str) -> int:
    """Nodes created (and deleted again) under each folder of ``base``, by cversion."""
    return sum(raw_zk.exists(f"{base}/{child}").cversion
               for child in raw_zk.get_children(base))


@pytest.mark.parametrize("capacity", [1, 3])
def test_four_waiters_polling_a_full_lock_create_no_nodes(make, raw_zk, root, capacity):
    holders = make()
    held = [holders.acquire("full", capacity, holder(f"h{i}"), TTL) for i in range(capacity)]
    waiters = [make() for _ in range(4)]
    for waiter in waiters:
        assert waiter.acquire("full", capacity, holder("w"), TTL) is None  # sessions up
    base = f"{root}/full"
    before, stop, polls, got = nodes_created(raw_zk, base), threading.Event(), [0], []

    def poll(waiter: ZooKeeperBackend) -> None:
        while not stop.is_set() and not got:
            lease = waiter.acquire("full", capacity, holder("w"), TTL)
            polls[0] += 1
            if lease is not None:
                got.append((time.monotonic(), lease))
            time.sleep(0.002)  # the api layer's shortest poll interval

    threads = [threading.Thread(target=poll, args=(waiter,)) for waiter in waiters]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    churn = (nodes_created(raw_zk, base) - before) / 2  # a create and a delete each
    elapsed = time.monotonic() - started
    print(f"capacity {capacity}: {churn:.0f} nodes created in {elapsed:.1f} s "
          f"({churn / elapsed:.0f}/s) by 4 waiters polling {polls[0] / elapsed:.0f} times/s")
    released_at = time.monotonic()
    holders.release(held[-1])
    wait_for(lambda: got, 5)
    stop.set()
    for thread in threads:
        thread.join(5)

    assert churn == 0
    assert len(got) == 1 and got[0][0] - released_at < 1.0  # a freed slot is seen at once


# -- review findings: a lock given up quietly, a session the server shortened ----------

def test_a_semaphore_lock_given_up_on_a_connection_loss_grants_nothing(backend, monkeypatch):
    # kazoo's Lock.acquire returns False (instead of raising) when a connection
    # loss interrupts it; the recipe then has no lease node, slot -1 and token 0.
    from kazoo.recipe import lock as kazoo_lock

    monkeypatch.setattr(kazoo_lock.Lock, "acquire", lambda self, *a, **kw: False)
    assert backend.acquire("given-up", 1, holder("phantom"), TTL) is None
    monkeypatch.undo()
    lease = backend.acquire("given-up", 1, holder("real"), TTL)
    assert lease is not None and lease.token > 0
    assert [h.holder.task_id for h in backend.holders("given-up")] == ["real"]


def test_validity_counts_on_the_session_timeout_the_server_agreed_to(make):
    from tests.faults.servers import ZooKeeperServer

    server = ZooKeeperServer().start()  # tick 2 s: the server allows sessions of 4-40 s
    try:
        backend = make(hosts=server.hosts, timeout=60)
        lease = backend.acquire("capped", 1, holder("t"), TTL)
        assert backend._client().negotiated_timeout == pytest.approx(40, abs=0.01)
        assert lease.remaining() <= 40 * 0.9
        assert backend.renew(lease) and lease.remaining() <= 40 * 0.9
    finally:
        server.remove()
