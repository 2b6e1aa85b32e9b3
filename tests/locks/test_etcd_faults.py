"""Fault experiments on the etcd backend: races, moved clocks, a server that stops or
loses replies.

* A renewal racing an acquirer that polls (no injection): never two holders.
* A renewal past the lease's validity is refused, never an extension.
* A process whose clock is 5 s ahead is not granted a held lock; one whose clock
  is behind does not keep counting on a lease that etcd expired (``faketime``).
* Our own etcd on a spare port, stopped and restarted: renew raises ``LockError``
  (not False), acquire fails fast, a restart within the TTL keeps the holder's
  lease (etcd persists leases) and grants nobody else.
* A TCP proxy that swallows replies during acquire: ``LockError``, and the slot
  granted without an answer does not stay taken for the TTL.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from django.conf import settings
from etcd3gw.client import Etcd3Client

from django_celery_adv.exceptions import LockError
from django_celery_adv.locks.backends.base import Holder
from django_celery_adv.locks.backends.etcd import EtcdBackend
from tests.faults.clock import run_with_clock
from tests.faults.proxy import TcpProxy
from tests.faults.servers import EtcdServer, wait_until

TTL = 30


def holder(task_id: str) -> Holder:
    return Holder(task_id=task_id, hostname="etcd-fault-host", pid=4343)


@pytest.fixture
def prefix() -> str:
    return f"/celery-adv-test/etcd-faults-{uuid.uuid4().hex[:12]}/"


@pytest.fixture
def make(prefix) -> Iterator[Callable[..., EtcdBackend]]:
    """Backends on the shared etcd unless ``port`` says otherwise; closed at the end."""
    made: list[EtcdBackend] = []

    def make(**options) -> EtcdBackend:
        options = {"host": "127.0.0.1", "port": settings.ETCD_PORT, "prefix": prefix,
                   **options}
        made.append(EtcdBackend("etcd", options))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


# -- A2: a renewal racing an acquirer ----------------------------------------------------

def test_renewals_racing_polling_acquirers_never_give_two_holders(make):
    """Holders renew around the end of their TTL (sometimes just late) while a
    rival polls the same name: a grant must never return before the validity
    the previous holder was given by its last successful grant or renewal."""
    names = {f"race-{i}": ttl for i, ttl in enumerate((1, 1, 1, 2))}
    deadline = time.monotonic() + 8
    guard = threading.Lock()
    claims = dict.fromkeys(names, 0.0)  # monotonic end of the current holder's validity
    overlaps: list[str] = []
    counts = {"grants": 0, "renewed": 0, "refused": 0, "errors": 0}
    errors: list[BaseException] = []

    def contender(name: str, ttl: int, seed: int) -> None:
        backend, rnd = make(timeout=2), random.Random(seed)
        try:
            while time.monotonic() < deadline:
                sent = time.monotonic()
                try:
                    lease = backend.acquire(name, 1, holder(f"{name}-{seed}"), ttl)
                except LockError:  # a timeout on a loaded machine: not what we test
                    counts["errors"] += 1
                    continue
                if lease is None:
                    time.sleep(0.003)
                    continue
                granted = time.monotonic()
                with guard:
                    if granted < claims[name]:
                        overlaps.append(f"{name}: granted {claims[name] - granted:.3f} s before "
                                        "the previous holder's renewed validity ended")
                    claims[name] = sent + ttl
                    counts["grants"] += 1
                for _ in range(rnd.randint(2, 5)):
                    time.sleep(ttl * rnd.uniform(0.75, 1.15))  # now and then just too late
                    sent = time.monotonic()
                    try:
                        renewed = backend.renew(lease)
                    except LockError:
                        counts["errors"] += 1
                        break
                    if not renewed:
                        counts["refused"] += 1
                        break
                    with guard:
                        claims[name] = max(claims[name], sent + ttl)
                        counts["renewed"] += 1
                else:
                    with guard:
                        claims[name] = 0.0  # gives it up before releasing
                with contextlib.suppress(LockError):
                    backend.release(lease)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=contender, args=(name, ttl, seed))
               for name, ttl in names.items() for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    print(f"race: {counts}, overlaps: {len(overlaps)}")
    assert not errors, errors[:3]
    assert not overlaps, overlaps
    # The experiment happened: grants, renewals that held, and late ones refused.
    assert counts["grants"] >= len(names) and counts["renewed"] >= 4 and counts["refused"] >= 1
    assert counts["errors"] <= counts["grants"], counts


def test_renewal_past_the_lease_validity_is_refused_and_frees_the_slot(make):
    backend, rival = make(), make()
    lease = backend.acquire("late", 1, holder("late"), 1)
    assert lease is not None
    time.sleep(1.3)  # past our TTL; etcd's lease (2 s minimum) may well still be there

    assert backend.renew(lease) is False
    assert not lease.is_valid()
    # Given up at once: the rival need not wait for etcd to expire it.
    assert rival.acquire("late", 1, holder("rival"), TTL) is not None


# -- A7: moved clocks ----------------------------------------------------------------

CHILD = """
import json, time
from django_celery_adv.locks.backends.base import Holder
from django_celery_adv.locks.backends.etcd import EtcdBackend
backend = EtcdBackend("etcd", {{"host": "127.0.0.1", "port": {port}, "prefix": {prefix!r}}})
lease = backend.acquire({name!r}, 1, Holder(task_id={task!r}), {ttl})
result = {{"granted": lease is not None, "valid_at_grant": bool(lease and lease.is_valid())}}
"""

CHILD_WAITS_TO_BE_OVERTAKEN = """
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    if any(h.holder.task_id != {task!r} for h in backend.holders({name!r})):
        result["overtaken"] = True
        result["valid_when_overtaken"] = lease.is_valid()
        break
    time.sleep(0.02)
"""


def child_code(prefix: str, name: str, task: str, ttl: float, then: str = "") -> str:
    values = {"port": settings.ETCD_PORT, "prefix": prefix, "name": name, "task": task,
              "ttl": ttl}
    return (CHILD + then + "\nprint(json.dumps(result))\n").format(**values)


def test_a_process_whose_clock_is_ahead_is_not_granted_a_held_lock(make, prefix):
    backend = make()
    lease = backend.acquire("ahead", 1, holder("here"), 4)
    stop, renewed = threading.Event(), []

    def keep_renewing() -> None:
        while not stop.wait(1):
            renewed.append(backend.renew(lease))

    thread = threading.Thread(target=keep_renewing)
    thread.start()
    try:
        result = run_with_clock("+5s", child_code(prefix, "ahead", "ahead", 4))
        # The child may be done within a second: still see the holder renew once.
        wait_until(lambda: renewed, 5, "a renewal by the holder")
    finally:
        stop.set()
        thread.join()

    print(f"+5s process: {result}")
    assert result["granted"] is False
    assert renewed and all(renewed)
    assert [h.token for h in backend.holders("ahead")] == [lease.token]


def test_a_process_whose_clock_is_behind_stops_counting_on_an_expired_lease(make, prefix):
    """The skewed process holds with TTL 2 and never renews; we are granted the
    slot once etcd expired its lease, not before, and by then it knows."""
    backend = make()
    outcome: dict = {}

    def skewed() -> None:
        code = child_code(prefix, "behind", "behind", 2,
                          CHILD_WAITS_TO_BE_OVERTAKEN.format(task="behind", name="behind"))
        outcome.update(run_with_clock("-5s", code))

    thread = threading.Thread(target=skewed)
    thread.start()
    try:
        # Read raw: not through a backend that might judge the key by a clock.
        raw = Etcd3Client(port=settings.ETCD_PORT, timeout=5)
        wait_until(lambda: raw.get_prefix(f"{prefix}behind/slots/"), 30,
                   "the skewed process's grant", interval=0.02)
        seen = time.monotonic()
        wait_until(lambda: outcome or backend.acquire("behind", 1, holder("here"), TTL), 10,
                   "our grant", interval=0.02)
        waited = time.monotonic() - seen
    finally:
        thread.join(60)

    print(f"-5s process: {outcome}; granted to us {waited:.2f} s after we saw its grant")
    assert waited > 1.0  # its TTL is 2 s by etcd's clock, whatever its own says
    assert outcome["granted"] and outcome["valid_at_grant"]
    assert outcome["overtaken"] and outcome["valid_when_overtaken"] is False


# -- our own etcd: stopped, restarted, replies lost ------------------------------------

@pytest.fixture(scope="module")
def server() -> Iterator[EtcdServer]:
    server = EtcdServer()
    server.start()
    yield server
    server.remove()


@pytest.fixture
def own(server, make) -> Callable[..., EtcdBackend]:
    """A backend on our own etcd, which is (re)started for each test."""
    if server.process is None or server.process.poll() is not None:
        server.start()
    return lambda **options: make(**{"port": server.port, "timeout": 1, **options})


def test_stopped_server_renew_and_acquire_raise_lock_error_and_a_restart_keeps_the_lease(
        own, server):
    backend, rival = own(), own()
    lease = backend.acquire("outage", 1, holder("holder"), 10)
    server.stop()

    with pytest.raises(LockError) as renewing:
        backend.renew(lease)  # an outage is not a loss: the heartbeat tries again
    started = time.monotonic()
    with pytest.raises(LockError):
        rival.acquire("outage", 1, holder("rival"), 10)
    assert time.monotonic() - started < 1.5  # refused at once, within the 1 s timeout
    assert renewing.value.__cause__ is not None

    server.start()  # within the TTL: etcd kept the lease and its key
    wait_until(lambda: _answers(rival), 15, "etcd to elect itself again")
    assert backend.renew(lease) is True
    assert rival.acquire("outage", 1, holder("rival"), 10) is None
    assert [h.token for h in rival.holders("outage")] == [lease.token]


def _answers(backend: EtcdBackend) -> bool:
    try:
        backend.holders("anything")
        return True
    except LockError:
        return False


def test_replies_lost_during_acquire_raise_lock_error_and_leave_no_slot_taken(
        own, server, monkeypatch):
    direct = own()
    proxy = TcpProxy(server.port)
    try:
        proxied = own(port=proxy.port)
        assert proxied.holders("lost") == []  # connected through the proxy
        proxy.drop_replies()
        with pytest.raises(LockError):  # the lease grant's reply is lost
            proxied.acquire("lost", 1, holder("lost-grant"), TTL)
        assert direct.holders("lost") == []

        # Now the grant's reply arrives and the transaction's is lost: etcd
        # applied it, the caller only sees a timeout.
        proxy.forward()
        grant = Etcd3Client.lease

        def grant_then_drop(self, ttl):
            etcd_lease = grant(self, ttl)
            proxy.drop_replies()
            return etcd_lease

        monkeypatch.setattr(Etcd3Client, "lease", grant_then_drop)
        with pytest.raises(LockError):
            proxied.acquire("lost", 1, holder("lost-commit"), TTL)
        monkeypatch.undo()
        # Not blocked for the 30 s TTL: the failed acquire revoked its lease.
        other = direct.acquire("lost", 1, holder("next"), TTL)
        assert other is not None, json.dumps([h.holder.as_dict() for h in direct.holders("lost")])
    finally:
        proxy.close()
