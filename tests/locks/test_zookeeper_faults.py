"""ZooKeeperBackend under faults: a server that stops answering, a holder
SIGSTOPped past its session, a fork, a reply lost after the server applied a
grant, a moved clock.

Each test talks to this module's own ZooKeeper (``ZooKeeperServer``, 2 s tick),
through a ``TcpProxy`` where the network has to fail.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from kazoo.client import KazooClient

from django_celery_adv.exceptions import LockError
from django_celery_adv.locks.backends.zookeeper import ZooKeeperBackend
from tests.faults.clock import REPO, run_with_clock
from tests.faults.proxy import TcpProxy
from tests.faults.servers import ZooKeeperServer
from tests.locks.test_zookeeper_backend import SESSION_TIMEOUT, TICK, TTL, holder, wait_for


@pytest.fixture(scope="module")
def server() -> Iterator[ZooKeeperServer]:
    server = ZooKeeperServer().start()
    yield server
    server.remove()


@pytest.fixture
def proxy(server) -> Iterator[TcpProxy]:
    proxy = TcpProxy(server.port)
    yield proxy
    proxy.close()


@pytest.fixture
def options(server) -> dict:
    return {"hosts": server.hosts, "root": f"/faults-{uuid.uuid4().hex[:12]}",
            "timeout": SESSION_TIMEOUT}


@pytest.fixture
def make(options) -> Iterator[Callable[..., ZooKeeperBackend]]:
    made: list[ZooKeeperBackend] = []

    def make(**overrides) -> ZooKeeperBackend:
        made.append(ZooKeeperBackend("zookeeper", {**options, **overrides}))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def raw_zk(server) -> Iterator[KazooClient]:
    client = KazooClient(hosts=server.hosts)
    client.start(timeout=10)
    yield client
    client.stop()
    client.close()


def connected(backend: ZooKeeperBackend) -> bool:
    return backend._client().connected


# -- an outage shorter than the session: SUSPENDED, then the same session -------------

def outage(backend: ZooKeeperBackend, proxy: TcpProxy, during: Callable[[], None]) -> None:
    """Cut the backend off for 0.4 session timeout, run ``during`` as soon
    as the client has noticed (SUSPENDED), then heal: the session survives."""
    session = backend._client().client_id[0]
    proxy.blackhole()
    proxy.cut()  # the client sees the connection drop at once
    cut_at = time.monotonic()
    wait_for(lambda: not connected(backend), 2, step=0.001)
    during()
    time.sleep(max(0.0, cut_at + SESSION_TIMEOUT * 0.4 - time.monotonic()))
    proxy.forward()
    proxy.cut()  # end the handshake kazoo sent into the blackhole: reconnect now
    wait_for(lambda: connected(backend), SESSION_TIMEOUT)
    assert backend._client().client_id[0] == session  # the session survived


def test_suspended_connection_makes_leases_invalid_until_a_renew_confirms(make, proxy):
    backend = make(hosts=f"127.0.0.1:{proxy.port}")
    leases = [backend.acquire(name, 2, holder(name), TTL) for name in ("a", "b")]
    assert all(lease.is_valid() for lease in leases)
    seen = {}

    def check() -> None:
        # SUSPENDED means "not held" at once (Curator's rule), not a TTL later.
        seen["valid"] = [lease.is_valid() for lease in leases]
        started = time.monotonic()
        with pytest.raises(LockError):
            backend.renew(leases[0])  # fails at once instead of waiting to reconnect
        seen["renew_failed_in"] = time.monotonic() - started

    outage(backend, proxy, check)
    print("while suspended:", seen)
    assert seen["valid"] == [False, False]
    assert seen["renew_failed_in"] < 0.5
    assert not leases[1].is_valid()  # reconnected, but not confirmed yet
    assert backend.renew(leases[1]) is True and leases[1].is_valid()
    assert not leases[1].lost


def test_outage_within_the_session_leaves_no_orphan_node_of_a_lost_lease(make, proxy):
    backend, other = make(hosts=f"127.0.0.1:{proxy.port}"), make()
    released = backend.acquire("released", 1, holder("released"), TTL)
    renewed = backend.acquire("renewed", 1, holder("renewed"), TTL)
    # What the api layer's heartbeat does with a lease it cannot renew in time.
    outage(backend, proxy, lambda: [released.mark_lost(), renewed.mark_lost()])

    # The lost leases' nodes outlived the outage with the session: release
    # (and a renew that finds one) deletes them, or they would block the lock
    # for as long as this process lives.
    backend.release(released)
    assert backend.renew(renewed) is False
    grants = {name: other.acquire(name, 1, holder("next"), TTL) is not None
              for name in ("released", "renewed")}
    assert grants == {"released": True, "renewed": True}


# -- a holder paused past its session -------------------------------------------------

PAUSED_HOLDER = """
import json, signal, sys, time
from django_celery_adv.locks.backends.base import Holder
from django_celery_adv.locks.backends.zookeeper import ZooKeeperBackend
backend = ZooKeeperBackend("zookeeper", json.loads(sys.argv[1]))
lease = backend.acquire("paused", 1, Holder(task_id="paused"), 60)
seen = []

def resumed(signum, frame):  # the first Python code to run after SIGCONT
    seen.append({"valid": lease.is_valid(), "remaining": round(lease.remaining(), 1)})

signal.signal(signal.SIGCONT, resumed)
print(json.dumps({"token": lease.token, "valid": lease.is_valid()}), flush=True)
while not seen:
    time.sleep(0.005)
print(json.dumps(seen[0]), flush=True)
"""


def read_json(child: subprocess.Popen, timeout: float) -> dict:
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    assert ready, f"no line from the child within {timeout} s"
    return json.loads(child.stdout.readline())


def test_holder_stopped_past_its_session_reads_invalid_at_once_after_sigcont(make, options):
    other = make()
    child = subprocess.Popen([sys.executable, "-c", PAUSED_HOLDER, json.dumps(options)],
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        first = read_json(child, 30)
        assert first["valid"] is True
        child.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        # Its session expires: another process is granted the lock.
        taken = wait_for(lambda: other.acquire("paused", 1, holder("taker"), TTL),
                         SESSION_TIMEOUT + 2 * TICK + 1, step=0.05)
        stopped_for = time.monotonic() - stopped_at
        child.send_signal(signal.SIGCONT)
        seen = read_json(child, 10)
        print(f"the holder stopped for {stopped_for:.1f} s, at SIGCONT:", seen)
    finally:
        child.kill()
        child.wait(10)

    assert taken.token > first["token"]
    assert seen["valid"] is False and seen["remaining"] < 0


# -- fork -------------------------------------------------------------------------------

def test_forked_child_neither_sees_nor_frees_the_parents_lease(make, raw_zk, options):
    backend = make()
    lost: list[int] = []
    parent = backend.acquire("parent", 1, holder("parent"), TTL)
    parent.on_lost = lambda lease: lost.append(os.getpid())
    parent_session = backend._client().client_id[0]
    read, write = os.pipe()

    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            started = time.monotonic()
            own = backend.acquire("child", 1, holder("child"), TTL)
            took = time.monotonic() - started
            backend.release(parent)  # inherited, not its own: must free nothing
            time.sleep(1.0)  # room for a listener of the parent's client to misfire
            report = {"took": took, "own": own is not None, "lost": lost,
                      "session": backend._client().client_id[0]}
            os.write(write, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        report = json.loads(pipe.read() or "{}")

    assert os.waitstatus_to_exitcode(status) == 0
    print("child:", report)
    assert report["own"] and report["took"] < 1.0
    assert report["session"] != parent_session
    assert report["lost"] == [] and lost == []
    # The parent's lease is still there, and still the parent's.
    assert [h.token for h in backend.holders("parent")] == [parent.token]
    assert backend.renew(parent) is True
    assert make().acquire("parent", 1, holder("intruder"), TTL) is None


# -- a reply lost after the server applied the grant ------------------------------------

def test_lease_node_whose_reply_was_lost_is_deleted_after_reconnection(make, proxy,
                                                                        monkeypatch):
    backend, other = make(hosts=f"127.0.0.1:{proxy.port}"), make()
    assert backend.acquire("warm", 1, holder("warm"), TTL) is not None  # connected
    client = backend._client()
    create = client.create

    def create_then_lose_the_reply(path, *args, **kwargs):
        if "/lost-reply/" in path and "__lock__" not in path:
            proxy.drop_replies()  # the server applies the create; we never hear of it
        return create(path, *args, **kwargs)

    monkeypatch.setattr(client, "create", create_then_lose_the_reply)
    outcome: list[BaseException | object] = []

    def acquire() -> None:
        try:
            outcome.append(backend.acquire("lost-reply", 1, holder("lost"), TTL))
        except BaseException as e:
            outcome.append(e)

    started = time.monotonic()
    thread = threading.Thread(target=acquire, daemon=True)
    thread.start()
    thread.join(SESSION_TIMEOUT * 2)  # kazoo notices a silent server within 2/3 of it
    print(f"acquire with its reply lost: {outcome} after {time.monotonic() - started:.1f} s")
    assert outcome and isinstance(outcome[0], LockError)
    proxy.forward()
    proxy.cut()
    wait_for(lambda: connected(backend), SESSION_TIMEOUT)
    assert backend._client().client_id[0] == client.client_id[0]  # the same session

    # Our lease node and the Semaphore's internal lock node would block the
    # lock for as long as this session lives; they are swept instead.
    wait_for(lambda: other.acquire("lost-reply", 1, holder("other"), TTL), 3)


# -- a moved clock ---------------------------------------------------------------------

MOVED_CLOCK = """
import json, time
from django_celery_adv.locks.backends.base import Holder
from django_celery_adv.locks.backends.zookeeper import ZooKeeperBackend
backend = ZooKeeperBackend("zookeeper", {options})
held = backend.acquire("clock", 1, Holder(task_id="moved"), 60)
own = backend.acquire("clock-own", 1, Holder(task_id="moved"), 60)
print(json.dumps({{"held": held is not None, "remaining": own.remaining(),
                   "valid": own.is_valid()}}))
backend.close()
"""


@pytest.mark.parametrize("offset", ["+1h", "-1h"])
def test_a_moved_clock_changes_neither_grants_nor_validity(make, options, offset):
    holder_lease = make().acquire("clock", 1, holder("here"), TTL)
    assert holder_lease is not None

    seen = run_with_clock(offset, MOVED_CLOCK.format(options=repr(options)))

    assert seen["held"] is False
    assert seen["valid"] is True and 0 < seen["remaining"] <= SESSION_TIMEOUT

