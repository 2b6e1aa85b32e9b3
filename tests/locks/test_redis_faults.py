"""RedisBackend under faults: lost replies, moved clocks, server restart and stop.

Every test that stops, restarts or proxies a server uses its own
``redis-server`` on a spare port (tests/faults/servers.py), never the shared
one. The clock tests run a second, real process under ``faketime`` against
the shared test Redis, each on its own key prefix.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings

from django_celery_adv.exceptions import LockError
from django_celery_adv.locks.backends.base import Holder, Lease
from django_celery_adv.locks.backends.redis import RedisBackend
from tests.faults.clock import run_with_clock
from tests.faults.proxy import TcpProxy
from tests.faults.servers import RedisServer

TTL = 30


def holder(task_id: str) -> Holder:
    return Holder(task_id=task_id, hostname="redis-fault-host", pid=6379)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    instance = RedisServer().start()
    yield instance
    instance.remove()


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test's own; its keys on the shared Redis go afterwards."""
    value = f"celery-adv-fault:{uuid.uuid4().hex[:10]}:"
    yield value
    with redis.Redis.from_url(settings.REDIS_LOCK_URL) as client:
        for key in client.scan_iter(match=f"{value}*"):
            client.delete(key)


@pytest.fixture
def make(prefix, request) -> Callable[..., RedisBackend]:
    """Factory: a backend on ``url`` under this test's prefix, closed afterwards."""
    def build(url: str, **options: Any) -> RedisBackend:
        backend = RedisBackend("redis", {"url": url, "prefix": prefix, **options})
        request.addfinalizer(backend.close)
        return backend

    return build


@pytest.fixture
def name() -> str:
    return f"fault-{uuid.uuid4().hex[:8]}"


def poll_acquire(backend: RedisBackend, name: str, task_id: str, within: float) -> Lease | None:
    """Try for ``within`` seconds to take the one slot of ``name``."""
    deadline = time.monotonic() + within
    while True:
        lease = backend.acquire(name, 1, holder(task_id), TTL)
        if lease is not None or time.monotonic() > deadline:
            return lease
        time.sleep(0.02)


# -- A8: a reply lost after the server applied the grant -----------------------

def test_acquire_whose_reply_was_lost_does_not_keep_the_slot(server, make, name):
    proxy = TcpProxy(server.port)
    try:
        lossy = make(f"redis://127.0.0.1:{proxy.port}/0", socket_timeout=1)
        direct = make(server.url)
        # Connected, and the acquire script cached by the server (else its
        # EVALSHA would be refused, unheard), while replies still arrive.
        lossy.release(lossy.acquire(f"{name}-warm", 1, holder("warm"), TTL))
        proxy.drop_replies()  # the server applies requests, the client hears nothing

        with pytest.raises(LockError) as info:
            lossy.acquire(name, 1, holder("unheard"), TTL)
        assert isinstance(info.value.__cause__, redis.TimeoutError)
        proxy.forward()

        # Far below the TTL of 30 s: the unheard grant was withdrawn.
        lease = poll_acquire(direct, name, "next", within=1.0)
        assert lease is not None, (
            f"slot still taken after the failed acquire: "
            f"{[(h.token, h.holder.task_id) for h in direct.holders(name)]}")
        assert lease.token == 2  # the lost request had been applied: it took token 1
    finally:
        proxy.close()


# -- A7: clocks of other hosts play no part -------------------------------------

#: Body of the process under faketime: take the lock without renewing, wait
#: until told, then say whether it still counts on the lease.
SKEWED = """
import json, pathlib, time
from django_celery_adv.locks.backends.base import Holder
from django_celery_adv.locks.backends.redis import RedisBackend
backend = RedisBackend("skewed", {{"url": {url!r}, "prefix": {prefix!r}}})
lease = backend.acquire({name!r}, 1, Holder(task_id="skewed"), {ttl!r})
go = pathlib.Path({go!r})
(go.parent / "asked").touch()
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.01)
seconds, micros = backend._client.get().redis.time()  # the server's clock: a true one
print(json.dumps({{"granted": lease is not None,
                  "offset": time.time() - (seconds + micros / 1e6),
                  "token": lease and lease.token,
                  "valid": lease is not None and lease.is_valid()}}))
"""


def run_skewed(offset: str, prefix: str, name: str, ttl: float, go: Path) -> tuple[
        threading.Thread, dict[str, Any]]:
    """Start the skewed process in a thread; its JSON lands in the returned dict."""
    out: dict[str, Any] = {}
    code = SKEWED.format(url=settings.REDIS_LOCK_URL, prefix=prefix, name=name, ttl=ttl,
                         go=str(go))

    def run() -> None:
        try:
            out.update(run_with_clock(offset, code, timeout=90))
        except BaseException as e:  # reported by the test
            out["error"] = repr(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_holder_whose_clock_is_behind_stops_counting_on_an_expired_lease(
        make, prefix, name, tmp_path):
    here = make(settings.REDIS_LOCK_URL)
    go = tmp_path / "go"
    thread, out = run_skewed("-5s", prefix, name, 2, go)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "asked").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        # The skewed process never renews: the server expires its lease by TTL.
        lease = poll_acquire(here, name, "here", within=15)
        assert lease is not None
    finally:
        go.touch()
        thread.join(90)

    assert out["granted"] is True, out
    assert lease.token == out["token"] + 1  # granted after the skewed process's lease
    assert out["offset"] < -4  # its clock really was 5 s behind
    assert out["valid"] is False, f"skewed holder still valid after another took the lock: {out}"


def test_process_whose_clock_is_ahead_is_not_granted_a_held_lock(make, prefix, name, tmp_path):
    here = make(settings.REDIS_LOCK_URL)
    held = here.acquire(name, 1, holder("here"), 20)
    go = tmp_path / "go"
    go.touch()  # nothing to wait for: report at once

    thread, out = run_skewed("+5s", prefix, name, 2, go)
    thread.join(90)

    assert "error" not in out, out
    assert out["offset"] > 4  # its clock really was 5 s ahead
    assert out["granted"] is False, out
    assert [h.token for h in here.holders(name)] == [held.token]


# -- A10 and server outages -------------------------------------------------------

def test_restart_without_persistence_restarts_tokens_and_loses_the_held_lease(
        server, make, name):
    backend = make(server.url, socket_timeout=2)
    for expected in (1, 2, 3):
        lease = backend.acquire(name, 1, holder("before"), TTL)
        assert lease.token == expected
        backend.release(lease)
    held = backend.acquire(name, 1, holder("held"), TTL)
    assert held.token == 4

    server.restart()  # no AOF, no RDB: leases and counter are gone

    assert backend.renew(held) is False  # reported lost, not silently kept
    again = backend.acquire(name, 1, holder("after"), TTL)
    # The documented limitation (module docstring): the token starts again at 1,
    # below tokens a fenced storage has already seen.
    assert again.token == 1
    assert [h.holder.task_id for h in backend.holders(name)] == ["after"]


def test_server_stopped_under_a_holder_raises_lock_error(server, make, name):
    timeout = 2.0
    backend = make(server.url, socket_timeout=timeout)
    held = backend.acquire(name, 1, holder("held"), TTL)

    server.stop()

    with pytest.raises(LockError) as info:
        backend.renew(held)  # the heartbeat retries this until the lease's expiry
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    assert "lock backend 'redis'" in str(info.value) and repr(name) in str(info.value)
    started = time.monotonic()
    with pytest.raises(LockError):
        backend.acquire(f"{name}-other", 1, holder("new"), TTL)
    assert time.monotonic() - started < timeout

    server.start()  # same port, empty: the client reconnects by itself
    assert backend.acquire(f"{name}-other", 1, holder("new"), TTL).token == 1
