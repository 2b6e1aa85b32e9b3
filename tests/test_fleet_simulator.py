"""The fleet simulator (bench/fleet.py) against a real worker and Celery's own API.

What the other fleet tests and the benchmark rely on: each simulated worker
answers every command with a reply of the same shape as a real prefork
worker's (same keys, same kinds of values, its own hostname and pids);
Celery's ``inspect`` sees exactly the simulated workers, on Redis and
RabbitMQ; destination, casts, silent and slow workers, events behave as
with real workers; the Redis fast path stores what kombu would.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import pytest

from bench.fleet import KombuWriter, RedisWriter, Request, task_id
from django_celery_adv.registry import apps
from tests.fleet import simulated_fleet, started_fleets
from tests.testapp.monitoring_tasks import monitored_sleep

#: What the reply of each command is compared on (Flower's refresh asks all but ping).
COMMANDS: dict[str, dict[str, Any]] = {
    "ping": {}, "stats": {}, "active": {}, "active_queues": {}, "registered": {},
    "scheduled": {}, "reserved": {}, "revoked": {}, "conf": {}, "report": {},
}
#: Mappings whose keys are data (task names, task ids, settings), not structure.
DATA_KEYED = {"stats.total", "query_task", "conf"}


def shape(value: Any, path: str) -> Any:
    """Keys and kinds of values, recursively; lists by their first element."""
    if isinstance(value, dict):
        if path in DATA_KEYED:
            return {"<key>": sorted({json.dumps(shape(item, path + ".*"))
                                     for item in value.values()})}
        return {key: shape(item, f"{path}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0], path + "[]")] if value else []
    if isinstance(value, bool) or value is None:
        return repr(type(value).__name__)
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def same_shape(ours: Any, theirs: Any) -> bool:
    """Shapes agree; an empty list agrees with any list (a real worker's ``revoked``
    holds what earlier tests revoked, the simulator's is empty)."""
    if isinstance(ours, list) and isinstance(theirs, list):
        return not ours or not theirs or same_shape(ours[0], theirs[0])
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return ours.keys() == theirs.keys() and all(
            same_shape(ours[key], theirs[key]) for key in ours)
    return ours == theirs


@pytest.fixture
def fleets():
    with started_fleets() as start:
        yield start


@pytest.fixture(scope="module")
def fleet_50():
    """50 simulated workers of the ``default`` app (Redis), shared by this module."""
    with simulated_fleet("default", 50) as fleet:
        yield fleet


@pytest.mark.workers
def test_every_reply_has_the_shape_of_a_real_prefork_workers(default_worker, fleet_50):
    app = apps["default"]
    simulated = fleet_50.hostnames[7]
    real = default_worker.name
    running = monitored_sleep.apply_async((20,), {"note": "shape"})
    try:
        inspector = app.control.inspect(destination=[real, simulated], timeout=3.0, limit=2)
        deadline = time.monotonic() + 15
        while not (inspector.active() or {}).get(real):
            assert time.monotonic() < deadline, "the real worker never ran the task"
        replies = {command: getattr(inspector, command)(**arguments) or {}
                   for command, arguments in COMMANDS.items()}
        replies["active:safe"] = inspector.active(safe=True) or {}
        replies["query_task"] = app.control.inspect(
            destination=[real, simulated], timeout=3.0, limit=2).query_task(
                running.id, task_id(simulated)) or {}
    finally:
        running.revoke(terminate=True)
    for command, by_worker in replies.items():
        assert set(by_worker) == {real, simulated}, (command, by_worker)
        path = command.partition(":")[0]
        ours, theirs = shape(by_worker[simulated], path), shape(by_worker[real], path)
        assert same_shape(ours, theirs), (command, ours, theirs)
    # The simulated worker speaks for itself: its name, its pids, its task.
    stats = replies["stats"][simulated]
    assert stats["pid"] not in (replies["stats"][real]["pid"],)
    assert stats["pool"]["max-concurrency"] == len(stats["pool"]["processes"])
    task = replies["active"][simulated][0]
    assert task["hostname"] == simulated and task["id"] == task_id(simulated)
    assert task["worker_pid"] in stats["pool"]["processes"]
    assert isinstance(replies["active:safe"][simulated][0]["args"], str)
    assert isinstance(replies["active"][simulated][0]["args"], list)
    assert list(replies["query_task"][simulated]) == [task_id(simulated)]
    assert list(replies["query_task"][real]) == [running.id]
    assert stats["broker"]["transport"] == "redis"


@pytest.mark.parametrize("alias", ["default", "global"])  # Redis, RabbitMQ
def test_celery_inspect_sees_exactly_the_simulated_workers(alias, fleets):
    fleet = fleets(alias, 120, prefix=f"sim{uuid.uuid4().hex[:6]}")
    inspector = apps[alias].control.inspect(timeout=1.0)
    started = time.monotonic()
    pings, stats = inspector.ping() or {}, inspector.stats() or {}
    elapsed = time.monotonic() - started
    ours = {name for name in pings if name.startswith(fleet.prefix + "-")}
    assert ours == set(fleet.hostnames)
    assert all(pings[name] == {"ok": "pong"} for name in ours)
    assert {name for name in stats if name.startswith(fleet.prefix + "-")} == ours
    assert len({stats[name]["pid"] for name in ours}) == 120
    assert elapsed < 8.0  # two readings of Celery's 1 s quiet period, not a stuck fleet
    assert fleet.counters()["replies"] == 240  # asked over the broker, fleet running
    counters = fleet.stop()
    assert counters["requests"] == 2 and counters["replies"] == 240, counters
    assert not counters["errors"]


def test_destination_casts_and_unknown_commands_as_a_worker_does(fleet_50):
    app = apps["default"]
    chosen = [fleet_50.hostnames[3], fleet_50.hostnames[41]]
    replies = app.control.inspect(destination=chosen, timeout=1.0, limit=2).ping() or {}
    assert set(replies) == set(chosen)
    # A cast gets no reply and changes nothing; the fleet keeps answering.
    app.control.broadcast("shutdown", destination=chosen)
    unknown = app.control.broadcast("no_such_command", destination=chosen[:1], reply=True,
                                    timeout=1.0, limit=1)
    assert unknown == [{chosen[0]: {"error": "KeyError('no_such_command')"}}]
    pattern = app.control.inspect(pattern=r"sim-4\d@", matcher="pcre", timeout=0.5).ping()
    assert set(pattern or {}) == {name for name in fleet_50.hostnames
                                  if re.match(r"sim-4\d@", name)}
    assert len(pattern) == 10


def test_silent_and_slow_workers_miss_a_short_reading(fleets):
    fleet = fleets("twin", 30, silent=2, slow=3, slow_latency=1.3)
    app = apps["twin"]
    simulated = set(fleet.hostnames)  # the session's real twin worker may answer too
    quick = app.control.inspect(timeout=0.5).ping() or {}
    assert set(quick) & simulated == set(fleet.hostnames[5:])
    # Celery waits up to its timeout for each next reply: 2.5 s covers the slow
    # ones' 1.3 s, with room for a simulator running late on a loaded machine.
    # (Not limit=: kombu counts the late replies to the quick reading, which it
    # then drops, towards the limit.)
    patient = app.control.inspect(timeout=2.5).ping() or {}
    assert set(patient) & simulated == set(fleet.hostnames[2:])
    # Every answering worker answered both readings (the slow ones late); the
    # silent two never did.
    assert fleet.counters()["replies"] == 2 * 28


def test_heartbeats_make_every_simulated_worker_alive_in_celerys_state(fleets):
    app = apps["twin"]
    state = app.events.State()
    seen: set[str] = set()
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": state.event})
        fleet = fleets("twin", 25, prefix="beat", heartbeat=0.5)
        deadline = time.monotonic() + 10
        for _ in receiver.itercapture(limit=None, timeout=1.0, wakeup=False):
            seen = {worker.hostname for worker in state.alive_workers()}
            if seen >= set(fleet.hostnames) or time.monotonic() > deadline:
                break
    assert seen >= set(fleet.hostnames)
    worker = state.workers[fleet.hostnames[0]]
    assert worker.freq == 0.5 and worker.sw_ident == "py-celery" and worker.loadavg


def test_the_redis_fast_path_stores_what_kombu_stores():
    from kombu import Exchange, Producer, Queue

    app = apps["default"]
    exchange = Exchange(f"reply.fast{uuid.uuid4().hex[:6]}.pidbox", "direct", durable=False,
                        delivery_mode="transient")
    with app.connection_for_write() as connection:
        channel = connection.channel()
        queue = Queue(f"q{uuid.uuid4().hex}", exchange, routing_key="oid-1")
        queue(channel).declare()
        request = Request("stats", {}, exchange.name, "oid-1", "ticket-1", 0.0)
        body = json.dumps({"sim-0@x": {"ok": "pong"}}).encode()
        Producer(channel).publish(body, exchange=exchange, routing_key="oid-1",
                                  content_type="application/json", content_encoding="utf-8",
                                  delivery_mode=1, headers={"ticket": "ticket-1", "clock": 9})
        RedisWriter(channel).write([(request, body)], 9)
        KombuWriter(channel).write([(request, body)], 9)
        with channel.conn_or_acquire() as client:
            stored = [json.loads(raw) for raw in client.lrange(queue.name, 0, -1)][::-1]
        queue(channel).delete()
    assert len(stored) == 3
    for message in stored:
        message["properties"].pop("delivery_tag")
    kombu, fast, batched = stored
    assert fast == kombu
    assert batched == kombu
