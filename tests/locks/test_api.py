"""The flow around the backends (locks/api.py, definitions.py): heartbeat, fork,
policy reload, messages. An in-memory backend stands in for a server here, so
each test can make renewals fail in ways no real server does on demand; every
backend's own behaviour is proven on its real server by the contract and fault suites.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from itertools import count

import pytest
from django.test import override_settings

from django_celery_adv import conf
from django_celery_adv.exceptions import LockUnavailable
from django_celery_adv.locks import lock
from django_celery_adv.locks.api import acquire_waiting, heartbeat, release, report_lost
from django_celery_adv.locks.backends import lock_backends
from django_celery_adv.locks.backends.base import Holder, Lease, LockBackend, utcnow
from django_celery_adv.locks.definitions import CHECK_SECONDS, policies
from django_celery_adv.models import LockDefinition, LockDefinitionChange
from django_celery_adv.registry import apps

pytestmark = pytest.mark.django_db(transaction=True)

MEMORY = "tests.locks.test_api.MemoryBackend"


class MemoryBackend(LockBackend):
    """Leases in a dict of this process; ``renew_plan`` scripts renewal outcomes."""

    tokens = count(1)

    def __init__(self, alias, options):
        super().__init__(alias, options)
        self.held: dict[str, dict[int, Lease]] = {}
        self.renewals = 0
        self.releases = 0
        self.renew_plan: list[object] = []  # exceptions to raise, then True
        self.closed = False
        #: Seconds a grant is confirmed for, if the server bounds it below the
        #: TTL (as a ZooKeeper session does).
        self.validity = options.get("validity")

    def acquire(self, name, capacity, holder, ttl):
        slots = self.held.setdefault(name, {})
        if len(slots) >= capacity:
            return None
        slot = min(set(range(capacity)) - set(slots))
        sent_at = time.monotonic()
        lease = Lease(name=name, slot=slot, token=next(self.tokens), holder=holder,
                      acquired_at=utcnow(), expires_at=utcnow(), ttl=ttl, backend=self.alias)
        lease.confirm(sent_at, self.validity or ttl)
        slots[slot] = lease
        return lease

    def release(self, lease):
        self.releases += 1
        self.held.get(lease.name, {}).pop(lease.slot, None)

    def renew(self, lease):
        self.renewals += 1
        sent_at = time.monotonic()
        if self.renew_plan:
            outcome = self.renew_plan.pop(0)
            if isinstance(outcome, BaseException):
                raise outcome
        lease.confirm(sent_at, self.validity or lease.ttl)
        return True

    def holders(self, name):
        return sorted(self.held.get(name, {}).values(), key=lambda lease: lease.slot)

    def force_release(self, name, token):
        for slot, lease in list(self.held.get(name, {}).items()):
            if lease.token == token:
                del self.held[name][slot]
                return True
        return False

    def close(self):
        self.closed = True


@pytest.fixture
def memory():
    backends = {**conf.lock_backend_settings(), "memory": {"BACKEND": MEMORY}}
    with override_settings(CELERY_ADV={**conf.user_settings(), "LOCK_BACKENDS": backends}):
        policies.invalidate()
        yield lock_backends["memory"]
    policies.invalidate()


@pytest.fixture
def name() -> str:
    return f"api-{uuid.uuid4().hex[:10]}"


def define(name: str, **fields) -> LockDefinition:
    return LockDefinition.objects.create(name=name, backend="memory", **fields)


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- B11: the heartbeat survives anything ------------------------------------------

def test_heartbeat_keeps_renewing_after_an_unexpected_error(memory, name):
    define(name, ttl=0.6)
    memory.renew_plan = [RuntimeError("client bug")]
    lost = []
    with lock(name, on_lost=lost.append) as lease:
        assert wait_for(lambda: memory.renewals >= 4, 3), \
            f"renewals stopped after {memory.renewals}: the heartbeat thread died"
        assert lease.is_valid() and lost == []


def test_renewal_failing_until_validity_passes_is_reported_lost_then(memory, name):
    define(name, ttl=1.2)
    memory.renew_plan = [RuntimeError("down")] * 100
    lost = []
    with lock(name, on_lost=lost.append) as lease:
        time.sleep(0.6)
        assert lost == [] and lease.is_valid()  # retried, still within its validity
        assert wait_for(lambda: lost == [lease], 3)
        assert not lease.is_valid()
        assert memory.renewals >= 3  # retried more often than once per ttl/3


def test_a_lease_confirmed_for_less_than_its_ttl_is_renewed_in_time(memory, name):
    memory.validity = 0.9  # e.g. ZooKeeper: valid for the session, not the lock TTL
    define(name, ttl=60)
    with lock(name) as lease:
        for _ in range(10):
            time.sleep(0.25)
            assert lease.is_valid(), f"invalid {-lease.remaining():.2f} s between renewals"


# -- A1: fork --------------------------------------------------------------------

def _in_child(body) -> int:
    """Run ``body`` in a forked child; its exit status (0 = body returned True)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        code = 1
        try:
            code = 0 if body() else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -1  # hung


def test_child_forked_right_after_an_acquire_starts_with_its_own_heartbeat(memory, name):
    define(name, ttl=30)
    other = f"{name}-child"
    define(other, ttl=30)
    with lock(name):
        def child() -> bool:
            if heartbeat.held():  # the parent's leases are not the child's to renew
                return False
            done = threading.Event()

            def take() -> None:
                with lock(other):
                    done.set()

            threading.Thread(target=take, daemon=True).start()
            return done.wait(1.0)  # hung forever when the condition was inherited held

        # The heartbeat's condition is held while a lease is added: fork then.
        with heartbeat.beat("memory")._wakeup:
            status = _in_child(child)
    assert status == 0, "the forked child could not take a lock within 1 s (or hung)"


def test_a_child_forked_while_the_policy_and_registry_locks_are_held_can_take_them(memory):
    def child() -> bool:
        policies.reload()  # takes the policy cache's lock
        lock_backends.reset()  # takes the registry's lock
        return True

    with policies._lock, lock_backends._lock:  # another thread inside them at fork time
        assert _in_child(child) == 0, "the child hung on a lock inherited held"


def test_a_forked_child_never_releases_the_parents_lease(memory, name):
    define(name, ttl=30)
    with lock(name) as lease:
        before = memory.releases
        assert _in_child(lambda: (release(lease), memory.releases == before)[1]) == 0
        assert [h.token for h in memory.holders(name)] == [lease.token]


# -- B16: policies follow the admin ------------------------------------------------

def test_a_waiting_caller_gets_in_when_the_capacity_is_raised(memory, name):
    definition = define(name, capacity=0)
    policy = policies.get(name, 1)
    result = {}
    waiter = threading.Thread(target=lambda: result.setdefault(
        "lease", acquire_waiting(policy, Holder(task_id="waiter"), 8)))
    waiter.start()
    time.sleep(0.3)
    raised_at = time.monotonic()
    definition.capacity = 10
    definition.save()
    waiter.join(10)
    assert result["lease"] is not None, "the waiting caller kept the paused policy"
    assert time.monotonic() - raised_at < CHECK_SECONDS + 1
    release(result["lease"])


def test_an_edit_from_another_process_is_seen_within_the_check_interval(memory, name):
    define(name, capacity=2)
    assert policies.get(name, 1).capacity == 2
    # Another process's save: its row write and its tracker bump, no signal here.
    LockDefinition.objects.filter(name=name).update(capacity=7)
    LockDefinitionChange.bump()
    assert wait_for(lambda: policies.get(name, 1).capacity == 7, CHECK_SECONDS + 1)


def test_no_definition_query_while_nothing_changed(memory, name, django_assert_num_queries):
    define(name)
    policies.get(name, 1)
    time.sleep(CHECK_SECONDS + 0.05)
    with django_assert_num_queries(1):  # the tracker row only
        policies.get(name, 1)
    with django_assert_num_queries(0):
        policies.get(name, 1)


def test_a_paused_lock_says_paused_not_busy(memory, name):
    define(name, capacity=0)
    with pytest.raises(LockUnavailable, match="paused"), lock(name):
        pass


# -- B18: the lost-lease log line names a holder outside a task ------------------------

def test_lost_lease_log_names_the_process_when_no_task_holds_it(caplog):
    lease = Lease(name="x", slot=0, token=3, holder=Holder(hostname="web1", pid=77),
                  acquired_at=utcnow(), expires_at=utcnow())
    with caplog.at_level(logging.ERROR, logger="django_celery_adv.locks"):
        report_lost(lease)
    assert "held by host web1 (pid 77)" in caplog.text and "None" not in caplog.text


# -- B15: override_settings resets the registries ---------------------------------------

def test_override_settings_rebuilds_only_what_changed(memory):
    kept_app = apps["default"]
    changed = {**conf.lock_backend_settings(), "memory": {"BACKEND": MEMORY, "OPTIONS": {"x": 1}}}
    with override_settings(CELERY_ADV={**conf.user_settings(), "LOCK_BACKENDS": changed}):
        assert lock_backends["memory"] is not memory
        assert lock_backends["memory"].options == {"x": 1}
        assert memory.closed
        assert apps["default"] is kept_app  # its settings did not change


def test_a_hung_backend_delays_only_its_own_leases(memory, name):
    # Renewals on one backend run one after another; a server that hangs must
    # not starve the leases held on another backend (review finding).
    backends = {**conf.lock_backend_settings(), "memory": {"BACKEND": MEMORY},
                "hung": {"BACKEND": MEMORY}}
    with override_settings(CELERY_ADV={**conf.user_settings(), "LOCK_BACKENDS": backends}):
        hung = lock_backends["hung"]
        release_hang = threading.Event()
        hung.renew = lambda lease: release_hang.wait(10) and False
        LockDefinition.objects.create(name=f"{name}-hung", backend="hung", ttl=0.6)
        define(name, ttl=0.6)
        policies.invalidate()
        try:
            with lock(f"{name}-hung"), lock(name) as healthy:
                for _ in range(8):
                    time.sleep(0.25)
                    assert healthy.is_valid(), "a hung backend starved another one's renewals"
        finally:
            release_hang.set()
