"""Faults every backend must survive: crashes, contention across processes, lost leases."""

from __future__ import annotations

import logging
import os
import signal
import time
from unittest import mock

import pytest
import redis
from django.conf import settings

from django_celery_adv.exceptions import LockError
from django_celery_adv.locks import lock
from django_celery_adv.locks.backends import create_backend, lock_backends
from django_celery_adv.locks.backends.base import Holder
from django_celery_adv.locks.definitions import policies
from django_celery_adv.models import LockDefinition
from tests.locks.conftest import (
    ALL_BACKENDS,
    PROCESS_BACKENDS,
    backend_params,
    mongo_client_patch,
    registry_alias,
)
from tests.locks.contention import contend_processes
from tests.workers import WorkerProcess


@pytest.fixture
def registry_backends():
    """The settings-driven registry that lock() uses, on mongomock where needed."""
    lock_backends.reset()
    policies.invalidate()
    with mongo_client_patch():
        yield lock_backends
    lock_backends.reset()
    policies.invalidate()


# -- 16 processes, one lock of capacity K, an independent counter ---------------

@pytest.mark.parametrize("alias", PROCESS_BACKENDS)
def test_sixteen_processes_never_exceed_capacity(alias, lock_name):
    capacity, processes, rounds = 3, 16, 8
    seen = contend_processes(lambda: create_backend(alias, backend_params(alias)), lock_name,
                             capacity, processes=processes, rounds=rounds)

    assert not seen.errors, seen.errors[0]
    assert seen.exitcodes == [0] * processes
    assert seen.grants == processes * rounds
    assert seen.over == 0 and seen.peak <= capacity
    assert seen.peak >= 2  # there was real contention to get right
    assert len(set(seen.tokens)) == len(seen.tokens)


# -- a worker holding a ticket is SIGKILLed ----------------------------------

@pytest.fixture(scope="module")
def victim_worker(default_worker):
    """Not shared: this worker gets killed. Concurrency 1, its own queue."""
    worker = WorkerProcess("default", tag="-victim", concurrency=1,
                           extra_args=("-Q", "victim"))
    yield worker
    worker.stop()


@pytest.mark.workers
@pytest.mark.parametrize("alias", PROCESS_BACKENDS)
def test_sigkilled_holder_frees_its_slot_within_ttl(alias, lock_name, victim_worker,
                                                    registry_backends):
    ttl = 2
    LockDefinition.objects.create(name=lock_name, backend=registry_alias(alias), capacity=1,
                                  ttl=ttl)
    backend = registry_backends[registry_alias(alias)]
    counter = redis.Redis.from_url(settings.REDIS_URL)
    victim_worker.start()
    from tests.testapp.tasks import hold_lock

    hold_lock.apply_async((lock_name, 120), queue="victim")
    deadline = time.monotonic() + 30
    while not counter.get(f"hold_lock:{lock_name}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(backend.holders(lock_name)) == 1

    os.killpg(victim_worker.process.pid, signal.SIGKILL)
    victim_worker.process.wait(10)
    killed_at = time.monotonic()
    # ZooKeeper ends a dead client's session after the session timeout, checked
    # once per tick (tickTime, 2 s by default): allow that one extra tick.
    limit = settings.CELERY_ADV["LOCK_BACKENDS"]["zookeeper"]["OPTIONS"]["timeout"] + 2 \
        if alias == "zookeeper" else ttl
    while backend.acquire(lock_name, 1, Holder(task_id="after"), 30) is None:
        assert time.monotonic() - killed_at <= limit + 1, "the dead holder's slot stayed taken"
        time.sleep(0.05)
    assert time.monotonic() - killed_at <= limit + 1
    counter.delete(f"hold_lock:{lock_name}")


# -- renewal keeps a long holder; a blocked renewal is reported ---------------

@pytest.mark.parametrize("alias", ALL_BACKENDS)
def test_holder_running_three_ttls_keeps_its_lease(alias, lock_name, registry_backends):
    ttl = 1
    LockDefinition.objects.create(name=lock_name, backend=registry_alias(alias), capacity=1,
                                  ttl=ttl)
    backend = registry_backends[registry_alias(alias)]

    with lock(lock_name) as lease:
        for _ in range(6):
            time.sleep(ttl / 2)
            assert [h.token for h in backend.holders(lock_name)] == [lease.token]
            assert backend.acquire(lock_name, 1, Holder(task_id="intruder"), 30) is None
        assert lease.is_valid()
    assert backend.holders(lock_name) == []


@pytest.mark.parametrize("alias", ALL_BACKENDS)
def test_refused_renewal_is_reported_lost(alias, lock_name, registry_backends, caplog):
    LockDefinition.objects.create(name=lock_name, backend=registry_alias(alias), capacity=1,
                                  ttl=1)
    backend = registry_backends[registry_alias(alias)]
    lost = []

    with mock.patch.object(backend, "renew", return_value=False), \
            caplog.at_level(logging.ERROR, logger="django_celery_adv.locks"), \
            lock(lock_name, on_lost=lost.append) as lease:
        deadline = time.monotonic() + 3
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)

        assert lost == [lease]
        assert not lease.is_valid()
        assert f"lock {lock_name}: lease lost" in caplog.text


def test_renewal_failing_with_server_errors_loses_the_lease_at_expiry(lock_name,
                                                                       registry_backends):
    LockDefinition.objects.create(name=lock_name, backend="redis", capacity=1, ttl=1)
    backend = registry_backends["redis"]
    lost = []

    with mock.patch.object(backend, "renew", side_effect=LockError("server down")), \
            lock(lock_name, on_lost=lost.append) as lease:
        time.sleep(0.5)
        assert lost == []  # not yet: the lease is still within its TTL
        deadline = time.monotonic() + 3
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lost == [lease]
