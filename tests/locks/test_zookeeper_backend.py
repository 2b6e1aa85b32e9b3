"""ZooKeeperBackend on the real ZooKeeper: recipes, sessions, faults.

The shared suite (test_contract.py) covers the contract; these tests cover what
only ZooKeeper has: kazoo's Lock and Semaphore side by side, the stored
``max_leases``, session expiry, and a connection that drops under the client.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from django.conf import settings
from kazoo.client import KazooClient
from kazoo.recipe.lock import Lock, Semaphore

from django_celery_adv.exceptions import LockError
from django_celery_adv.locks.backends import zookeeper
from django_celery_adv.locks.backends.base import Holder, Lease
from django_celery_adv.locks.backends.zookeeper import ZooKeeperBackend
from tests.locks.contention import contend

#: The server's minimum (2 ticks of 2 s): keeps the crash tests short.
SESSION_TIMEOUT = 4.0
#: ZooKeeper expires sessions in buckets of one tick.
TICK = 2.0
TTL = 30
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def holder(task_id: str) -> Holder:
    return Holder(task_id=task_id, hostname="zk-test-host", pid=4242)


def _host_port(hosts: str) -> tuple[str, int]:
    host, _, port = hosts.split(",")[0].rpartition(":")
    return host, int(port)


@pytest.fixture(scope="module")
def zk_hosts() -> str:
    hosts = settings.ZOOKEEPER_HOSTS
    try:
        socket.create_connection(_host_port(hosts), timeout=2).close()
    except OSError as e:
        pytest.fail(f"ZooKeeper is not reachable at {hosts} ({e}): run scripts/services.sh start")
    return hosts


@pytest.fixture
def root() -> str:
    return f"/celery-adv-test/zk-backend-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make(zk_hosts: str, root: str) -> Iterator[Callable[..., ZooKeeperBackend]]:
    made: list[ZooKeeperBackend] = []

    def make(**options) -> ZooKeeperBackend:
        options = {"hosts": zk_hosts, "root": root, "timeout": SESSION_TIMEOUT, **options}
        backend = ZooKeeperBackend("zookeeper", options)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def backend(make) -> ZooKeeperBackend:
    return make()


@pytest.fixture
def raw_zk(zk_hosts: str) -> Iterator[KazooClient]:
    client = KazooClient(hosts=zk_hosts)
    client.start(timeout=5)
    yield client
    client.stop()
    client.close()


def wait_for(predicate: Callable[[], object], timeout: float, step: float = 0.05) -> float:
    """Seconds until ``predicate()`` is true; fails the test after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        elapsed = time.monotonic() - started
        assert elapsed < timeout, f"condition not met within {timeout}s"
        time.sleep(step)
    return time.monotonic() - started


# -- capacity under contention ----------------------------------------------------

def test_sixteen_threads_never_exceed_capacity(backend):
    capacity, threads, rounds = 3, 16, 8
    seen = contend(backend, "sixteen", capacity, threads=threads, rounds=rounds, hold=0.03)

    assert not seen.errors, seen.errors[:3]
    assert seen.grants == threads * rounds
    assert 2 <= seen.peak <= capacity  # shared, never over capacity
    assert backend.holders("sixteen") == []


def _contend_in_child(backend: ZooKeeperBackend, now, peak, sessions, rounds: int) -> None:
    # Forked with the parent's backend object: it must open its own session.
    done = 0
    while done < rounds:
        lease = backend.acquire("eight", 2, holder(f"p{os.getpid()}"), TTL)
        if lease is None:
            time.sleep(0.003)
            continue
        with now.get_lock():
            now.value += 1
            peak.value = max(peak.value, now.value)
        time.sleep(0.02)
        with now.get_lock():
            now.value -= 1
        backend.release(lease)
        done += 1
    sessions.put(backend._client().client_id[0])
    backend.close()


def test_eight_forked_processes_never_exceed_capacity(backend):
    parent_lease = backend.acquire("eight", 2, holder("parent"), TTL)
    backend.release(parent_lease)  # the parent's client now exists and is connected
    parent_session = backend._client().client_id[0]
    context = multiprocessing.get_context("fork")
    now, peak, sessions = context.Value("i", 0), context.Value("i", 0), context.Queue()
    children = [context.Process(target=_contend_in_child,
                                args=(backend, now, peak, sessions, 6)) for _ in range(8)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)

    assert [child.exitcode for child in children] == [0] * 8
    child_sessions = {sessions.get(timeout=5) for _ in children}
    assert len(child_sessions) == 8 and parent_session not in child_sessions
    assert peak.value == 2
    assert backend.holders("eight") == []
    assert backend.acquire("eight", 2, holder("parent-again"), TTL) is not None  # still usable


# -- tokens ---------------------------------------------------------------------------

def test_tokens_are_the_lease_nodes_czxid_and_grow_across_both_recipes(backend, raw_zk, root):
    tokens = []
    for capacity in (1, 3, 1, 2, 3, 1):
        lease = backend.acquire("tokens", capacity, holder(f"c{capacity}"), TTL)
        assert lease is not None
        stat = raw_zk.exists(lease.handle.path)
        assert stat is not None and stat.czxid == lease.token
        tokens.append(lease.token)
        backend.release(lease)
    held = [backend.acquire("tokens", 3, holder(f"h{i}"), TTL) for i in range(3)]
    tokens.extend(lease.token for lease in held)

    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    assert [h.token for h in backend.holders("tokens")] == [lease.token for lease in held]


# -- crash release, session loss --------------------------------------------------

CHILD = """
import json, sys, time
from django_celery_adv.locks.backends.base import Holder
from django_celery_adv.locks.backends import zookeeper
from django_celery_adv.locks.backends.zookeeper import ZooKeeperBackend
backend = ZooKeeperBackend("zookeeper", json.loads(sys.argv[1]))
lease = backend.acquire("crash", 1, Holder(task_id="victim"), 30)
print(json.dumps({"token": lease.token}), flush=True)
while True:
    time.sleep(1)
"""


def test_sigkilled_holder_frees_its_slot_within_the_session_timeout(backend, zk_hosts, root):
    options = {"hosts": zk_hosts, "root": root, "timeout": SESSION_TIMEOUT}
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(options)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        token = json.loads(child.stdout.readline())["token"]
        [listed] = backend.holders("crash")
        assert (listed.token, listed.holder.task_id, listed.holder.pid) == \
            (token, "victim", child.pid)
        assert backend.acquire("crash", 1, holder("waiting"), TTL) is None
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    elapsed = wait_for(lambda: backend.acquire("crash", 1, holder("after"), TTL), 15)

    # The server rounds session expiry up to its next tick.
    assert elapsed <= SESSION_TIMEOUT + TICK + 0.5
    [listed] = backend.holders("crash")
    assert listed.holder.task_id == "after" and listed.token > token


def test_expired_session_marks_its_leases_lost(make, zk_hosts):
    backend, other = make(), make()
    lost: list[Lease] = []
    first = backend.acquire("session", 2, holder("first"), TTL)
    second = backend.acquire("session", 2, holder("second"), TTL)
    first.on_lost = lost.append
    second.on_lost = lost.append
    assert other.acquire("session", 2, holder("other"), TTL) is None

    # kazoo's own test trick: a second connection with the same session id,
    # closed, ends the session on the server.
    session_id, password = backend._client().client_id
    thief = KazooClient(hosts=zk_hosts, client_id=(session_id, password))
    thief.start(timeout=5)
    thief.stop()
    thief.close()

    wait_for(lambda: len(lost) == 2, 10)
    wait_for(lambda: backend._client().connected, 5)  # a new session
    assert {id(lease) for lease in lost} == {id(first), id(second)}
    assert first.lost and not first.is_valid()
    assert backend.renew(first) is False
    fresh = other.acquire("session", 2, holder("fresh"), TTL)
    assert fresh is not None and fresh.token > second.token
    backend.release(first)  # lost: frees nothing
    assert [h.holder.task_id for h in other.holders("session")] == ["fresh"]
    # The backend works on with its new session.
    assert backend._client().client_id[0] != session_id
    assert backend.acquire("session", 2, holder("again"), TTL) is not None


def test_stale_release_does_not_free_the_next_holders_slot(make):
    backend, other = make(), make()
    stale = backend.acquire("stale", 1, holder("stale"), TTL)
    assert backend.force_release("stale", stale.token) is True
    assert backend.renew(stale) is False
    fresh = other.acquire("stale", 1, holder("fresh"), TTL)

    backend.release(stale)
    assert other.renew(fresh) is True
    assert [h.token for h in backend.holders("stale")] == [fresh.token]
    assert backend.acquire("stale", 1, holder("third"), TTL) is None


# -- optimistic grants: what a concurrent grant of the other recipe does -----------------

@pytest.fixture
def in_window(monkeypatch):
    """Run ``action(client)`` once right after the recipe created our lease node.

    That is where a concurrent grant whose own check has not run yet can
    appear: the check that follows must see it.
    """
    def patch(recipe: str, action: Callable[[], None]) -> None:
        base = {"lock": Lock, "semaphore": Semaphore}[recipe]
        done = []

        class Injecting(base):  # type: ignore[valid-type, misc]
            def acquire(self, *args, **kwargs):
                gotten = super().acquire(*args, **kwargs)
                if gotten and not done and self.path.endswith(f"/{recipe}"):
                    done.append(True)
                    action()
                return gotten

        monkeypatch.setattr(zookeeper, base.__name__, Injecting)

    return patch


def test_a_lock_grant_backs_off_from_a_semaphore_lease_that_appears(backend, raw_zk, root,
                                                                    in_window):
    semaphore = f"{root}/racing/semaphore"
    raw_zk.ensure_path(semaphore)
    lease_path = f"{semaphore}/{uuid.uuid4().hex}-slot0"
    in_window("lock", lambda: raw_zk.create(lease_path, b"{}", ephemeral=True))

    assert backend.acquire("racing", 1, holder("lock"), TTL) is None
    assert raw_zk.get_children(f"{root}/racing/lock") == []  # our node was given back
    raw_zk.delete(lease_path)
    assert backend.acquire("racing", 1, holder("lock"), TTL) is not None


def test_a_lock_grant_older_than_a_semaphore_lease_that_came_and_went_retries(
        backend, raw_zk, root, in_window):
    semaphore = f"{root}/younger/semaphore"
    raw_zk.ensure_path(semaphore)
    younger = []

    def come_and_go() -> None:
        path = raw_zk.create(f"{semaphore}/{uuid.uuid4().hex}-slot0", b"{}", ephemeral=True)
        younger.append(raw_zk.exists(path).czxid)
        raw_zk.delete(path)

    in_window("lock", come_and_go)
    lease = backend.acquire("younger", 1, holder("lock"), TTL)

    # Granted on the second try: a token below the younger lease's would go backwards.
    assert lease is not None and lease.token > younger[0]
    assert raw_zk.get_children(f"{root}/younger/lock") == [lease.handle.path.rpartition("/")[2]]


def test_a_semaphore_grant_counts_a_lock_node_that_appears(make, raw_zk, root, in_window):
    backend, other = make(), make()
    held = other.acquire("mixed", 2, holder("held"), TTL)
    raw_zk.ensure_path(f"{root}/mixed/lock")
    in_window("semaphore", lambda: raw_zk.create(f"{root}/mixed/lock/x__lock__", b"{}",
                                                  ephemeral=True, sequence=True))

    # One Semaphore lease + the Lock's node: the capacity (2) is taken.
    assert backend.acquire("mixed", 2, holder("late"), TTL) is None
    assert raw_zk.get_children(f"{root}/mixed/semaphore") == \
        [held.handle.path.rpartition("/")[2]]


def test_a_semaphore_grant_older_than_a_lease_that_came_and_went_retries(
        backend, raw_zk, root, in_window):
    first = backend.acquire("sem-younger", 3, holder("first"), TTL)  # the Semaphore exists
    semaphore = f"{root}/sem-younger/semaphore"
    younger = []

    def come_and_go() -> None:
        path = raw_zk.create(f"{semaphore}/{uuid.uuid4().hex}-slot2", b"{}", ephemeral=True)
        younger.append(raw_zk.exists(path).czxid)
        raw_zk.delete(path)

    in_window("semaphore", come_and_go)
    lease = backend.acquire("sem-younger", 3, holder("second"), TTL)

    assert lease is not None and lease.token > younger[0] > first.token
    assert len(raw_zk.get_children(semaphore)) == 2


def test_a_stale_copy_of_the_lease_list_is_caught_by_the_check(make):
    backend, other = make(), make()
    backend.release(backend.acquire("copy", 3, holder("a"), TTL))  # its copy: no lease
    theirs = other.acquire("copy", 3, holder("b"), TTL)
    assert theirs.slot == 0

    ours = backend.acquire("copy", 3, holder("c"), TTL)  # slot 0 from the copy: caught

    assert ours.slot == 1 and ours.token > theirs.token
    assert [(h.slot, h.holder.task_id) for h in backend.holders("copy")] == [(0, "b"), (1, "c")]
    other.release(theirs)
    # The copy still has slot 0 taken: a free slot, not yet the lowest ...
    assert backend.acquire("copy", 3, holder("d"), TTL).slot == 2
    # ... but the check listed the leases: the copy is current again.
    assert backend.acquire("copy", 3, holder("e"), TTL).slot == 0
    assert [h.slot for h in other.holders("copy")] == [0, 1, 2]


def test_mixed_capacities_from_two_sessions_keep_count_slots_and_token_order(make):
    """Grants with capacity 1 and 2 on one name, from two sessions at once.

    A grant that started after another returned, and while that one is still
    held, must have counted it (within its own capacity), must not share its
    slot, and must get a larger token (the server is a single one: reads are
    linearizable).
    """
    backends = [make(), make()]
    mu = threading.Lock()
    seq = iter(range(10**9))
    live: dict[int, tuple[int, int]] = {}  # end seq -> (slot, token)
    grants: list[tuple[int, int, int]] = []  # (start seq, end seq, token)
    errors: list[str] = []

    def work(index: int) -> None:
        backend = backends[index % 2]
        for round_ in range(12):
            capacity = 1 + (index + round_) % 2
            while True:
                with mu:
                    start = next(seq)
                lease = backend.acquire("mixed-race", capacity, holder(f"w{index}"), TTL)
                if lease is not None:
                    break
                time.sleep(0.001)
            with mu:
                end = next(seq)
                before = {e: v for e, v in live.items() if e < start}
                if len(before) + 1 > capacity:
                    errors.append(f"{len(before) + 1} holders with capacity {capacity}")
                if lease.slot in {slot for slot, _ in before.values()}:
                    errors.append(f"slot {lease.slot} shared")
                live[end] = (lease.slot, lease.token)
                grants.append((start, end, lease.token))
            time.sleep(0.003)
            with mu:
                del live[end]
            backend.release(lease)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(120)

    assert not errors, errors[:5]
    assert len(grants) == 6 * 12
    for start, _, token in grants:
        earlier = [t for _, end, t in grants if end < start]
        assert not earlier or max(earlier) < token
    assert backends[0].holders("mixed-race") == []


# -- capacity changes ---------------------------------------------------------------

def test_lowered_capacity_counts_every_holder_of_both_recipes(backend):
    held = [backend.acquire("lowered", 3, holder(f"t{i}"), TTL) for i in range(3)]
    assert all(held)

    assert backend.acquire("lowered", 2, holder("new"), TTL) is None
    assert backend.acquire("lowered", 1, holder("new"), TTL) is None  # the Lock counts them too
    backend.release(held[0])
    assert backend.acquire("lowered", 2, holder("new"), TTL) is None
    assert all(backend.renew(lease) for lease in held[1:])  # holders keep theirs
    backend.release(held[1])
    granted = backend.acquire("lowered", 2, holder("new"), TTL)

    assert granted is not None and granted.slot == 0
    assert [(h.slot, h.holder.task_id) for h in backend.holders("lowered")] == \
        [(0, "new"), (2, "t2")]


def test_capacity_change_one_three_two_updates_the_stored_max_leases(backend, raw_zk, root):
    base = f"{root}/change"
    lock_lease = backend.acquire("change", 1, holder("lock"), TTL)
    assert lock_lease is not None and lock_lease.handle.path.startswith(f"{base}/lock/")

    # 1 -> 3: the Lock holder counts against the Semaphore.
    three = [backend.acquire("change", 3, holder(f"s{i}"), TTL) for i in range(3)]
    assert three[0] and three[1] and three[2] is None
    assert raw_zk.get(f"{base}/semaphore")[0] == b"3"

    # 3 -> 2: kazoo refuses a Semaphore whose max_leases differs from the stored 3.
    assert backend.acquire("change", 2, holder("two"), TTL) is None  # 3 held
    backend.release(lock_lease)
    backend.release(three[0])
    two = backend.acquire("change", 2, holder("two"), TTL)
    assert two is not None
    assert raw_zk.get(f"{base}/semaphore")[0] == b"2"
    assert backend.acquire("change", 2, holder("too-many"), TTL) is None
    # A plain kazoo client with the new capacity sees the same semaphore.
    foreign = Semaphore(raw_zk, f"{base}/semaphore", "foreign", max_leases=2)
    assert sorted(json.loads(i)["task_id"] for i in foreign.lease_holders()) == ["s1", "two"]
    assert foreign.acquire(blocking=False) is False

    # Back to 1 while Semaphore leases are held: nothing until they are gone.
    assert backend.acquire("change", 1, holder("lock-again"), TTL) is None
    backend.release(three[1])
    backend.release(two)
    assert backend.acquire("change", 1, holder("lock-again"), TTL) is not None


# -- holders, force_release ---------------------------------------------------------

def test_any_kazoo_client_can_list_the_holders(backend, raw_zk, root):
    backend.acquire("listed", 2, Holder(task_id="a", hostname="h1", pid=11), TTL)
    backend.acquire("listed", 2, Holder(task_id="b", hostname="h2", pid=22), TTL)
    backend.acquire("single", 1, Holder(task_id="c", hostname="h3", pid=33), TTL)

    identifiers = Semaphore(raw_zk, f"{root}/listed/semaphore", max_leases=2).lease_holders()
    assert sorted(json.loads(i)["task_id"] for i in identifiers) == ["a", "b"]
    [contender] = Lock(raw_zk, f"{root}/single/lock").contenders()
    assert json.loads(contender) == \
        {"task_id": "c", "hostname": "h3", "pid": 33, "slot": 0, "ttl": TTL}
    assert [(h.slot, h.holder) for h in backend.holders("listed")] == [
        (0, Holder(task_id="a", hostname="h1", pid=11)),
        (1, Holder(task_id="b", hostname="h2", pid=22)),
    ]


def test_force_release_frees_exactly_that_token(backend):
    keep = backend.acquire("forced", 2, holder("keep"), TTL)
    drop = backend.acquire("forced", 2, holder("drop"), TTL)

    assert backend.force_release("forced", drop.token + 10_000) is False
    assert backend.force_release("forced", drop.token) is True
    assert backend.force_release("forced", drop.token) is False
    assert backend.renew(drop) is False
    assert backend.renew(keep) is True
    assert [h.token for h in backend.holders("forced")] == [keep.token]
    assert backend.acquire("forced", 2, holder("next"), TTL) is not None


# -- unreachable server, dropped connection -----------------------------------------

def test_unreachable_server_raises_lock_error_within_seconds(make):
    backend = make(hosts="127.0.0.1:1")
    started = time.monotonic()
    with pytest.raises(LockError) as caught:
        backend.acquire("down", 1, holder("t"), TTL)

    assert time.monotonic() - started < backend.connect_timeout + 1.5
    assert caught.value.__cause__ is not None


class TcpProxy:
    """Forwards a local port to ZooKeeper; ``stop()`` cuts every connection."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.sockets: list[socket.socket] = []
        # Below the ephemeral range: kazoo's reconnects to a closed port from
        # that range can connect to themselves and take the port over.
        for port in random.sample(range(20000, 30000), 50):
            self.port = port
            try:
                self.start()
                return
            except OSError:
                continue
        raise RuntimeError("no free port for the proxy")

    def start(self) -> None:
        self.running = True
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen()
        self.listener.settimeout(0.1)
        self.acceptor = threading.Thread(target=self._accept, args=(self.listener,), daemon=True)
        self.acceptor.start()

    def _accept(self, listener: socket.socket) -> None:
        while self.running:
            try:
                downstream, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            downstream.settimeout(None)
            upstream = socket.create_connection(self.upstream)
            self.sockets += [downstream, upstream]
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.running = False
        self.acceptor.join(5)  # the kernel keeps the port listening while accept() waits
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.sockets = []


def test_dropped_connection_fails_fast_then_the_session_resumes(make, zk_hosts):
    proxy = TcpProxy(_host_port(zk_hosts))
    backend = make(hosts=f"127.0.0.1:{proxy.port}")
    try:
        lease = backend.acquire("dropped", 1, holder("t"), TTL)
        assert lease is not None
        proxy.stop()
        wait_for(lambda: not backend._client().connected, 5)

        # Suspended: every call fails at once instead of queueing.
        for call in (lambda: backend.acquire("dropped", 1, holder("u"), TTL),
                     lambda: backend.renew(lease), lambda: backend.holders("dropped")):
            started = time.monotonic()
            with pytest.raises(LockError):
                call()
            assert time.monotonic() - started < 0.5
        # In doubt: valid only until the server could expire the session.
        assert lease.expires_at.timestamp() < time.time() + SESSION_TIMEOUT / 3
        assert not lease.lost

        proxy.start()
        wait_for(lambda: backend._client().connected, SESSION_TIMEOUT)
        assert backend.renew(lease) is True  # same session: the node never went away
        assert lease.is_valid() and not lease.lost
        assert [h.token for h in backend.holders("dropped")] == [lease.token]
    finally:
        proxy.stop()
        backend.close()


def test_sweep_deletes_nodes_of_this_session_that_no_lease_owns(make, root):
    backend = make(guard_timeout=0.3)
    kept = backend.acquire("orphans", 2, holder("kept"), TTL)
    client = backend._client()
    # What a create cut off by a connection loss leaves behind.
    orphan = client.create(f"{root}/orphans/semaphore/{uuid.uuid4().hex}", b"{}",
                           ephemeral=True)
    # The Semaphore's own lock, taken by a create whose answer never came.
    stuck_lock = client.create(f"{root}/orphans/semaphore-__lock__/x__lock__", b"",
                               ephemeral=True, sequence=True)
    assert backend.acquire("orphans", 2, holder("blocked"), TTL) is None  # the lock is stuck
    backend._dirty.add("orphans")

    backend._sweep(client)

    assert client.exists(orphan) is None and client.exists(stuck_lock) is None
    assert client.exists(kept.handle.path) is not None
    assert backend.acquire("orphans", 2, holder("free"), TTL) is not None
