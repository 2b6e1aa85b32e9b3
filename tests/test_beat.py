"""LockedScheduler with real ``celery beat`` processes: one leader per app, fenced
sends, failover after SIGKILL / SIGSTOP / a lock-server outage, per-app schedules,
locked periodic tasks skipped while busy.

Sends are counted at the broker (:class:`tests.beats.Collector` consumes the
periodic tasks' queue); nothing runs them. TTL 3 s, so a tick is at most 0.75 s.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from collections.abc import Iterator

import pytest
from django.conf import settings
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from django_celery_adv.beat.health import WRITE_EVERY
from django_celery_adv.locks import lock
from django_celery_adv.locks.backends.base import HOSTNAME
from django_celery_adv.models import BeatNode, PeriodicTaskApp
from tests.beats import BeatProcess, Collector, Sent
from tests.faults.servers import RedisServer, wait_until

pytestmark = [pytest.mark.workers, pytest.mark.db, pytest.mark.django_db(transaction=True)]

TTL = 3.0
TICK = TTL / 4
#: A loaded 2-core machine: start-up, scheduling and SQLite writes take their time.
SLACK = 2.0
#: ZooKeeper frees a dead holder's slot when its session (4 s in the tests' settings)
#: expires, which the server checks once per tick (2 s).
VALIDITY = {"default": TTL, "redis": TTL, "etcd": TTL, "zookeeper": 6.0}


@pytest.fixture
def beats() -> Iterator:
    started: list[BeatProcess] = []

    def start(alias: str = "default", count: int = 3, **options) -> list[BeatProcess]:
        new = [BeatProcess(alias, f"{len(started) + i}", **options).start()
               for i in range(count)]
        started.extend(new)
        return new

    yield start
    for beat in started:  # all at once, and no waiting out a slow clean exit: the
        beat.signal(signal.SIGCONT)  # next test has a fresh database and queue
        beat.signal(signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not any(beat.alive() for beat in started), 1.5, "clean exits")
    for beat in started:
        beat.signal(signal.SIGKILL)
        beat.stop()


@pytest.fixture
def collector() -> Iterator[Collector]:
    collector = Collector(settings.REDIS_URL).start()
    yield collector
    collector.stop()


def every_second(name: str, task: str, queue: str) -> PeriodicTask:
    interval, _ = IntervalSchedule.objects.get_or_create(every=1,
                                                         period=IntervalSchedule.SECONDS)
    return PeriodicTask.objects.create(name=name, task=task, interval=interval, queue=queue)


def wait_sends(collector: Collector, count: int, timeout: float, beats=()) -> None:
    try:
        wait_until(lambda: len(collector.sent) >= count, timeout, f"{count} sends")
    except TimeoutError:
        raise AssertionError("no sends; beat logs:\n" + logs(beats)) from None


def logs(beats) -> str:
    return "\n".join(f"--- {beat.log_path.name}\n{beat.log()[-3000:]}" for beat in beats)


def fresh_leaders(alias: str = "default") -> list[BeatNode]:
    """Leader rows written lately: a row is rewritten on a tick (at most TICK apart)
    once WRITE_EVERY has passed, plus slack for a loaded machine; a leader killed
    or paused in these tests stopped writing longer ago than that."""
    recent = timezone.now() - timezone.timedelta(seconds=WRITE_EVERY + 2 * TICK + 1.5)
    return list(BeatNode.objects.filter(app_alias=alias, role="leader", last_tick__gte=recent))


def leader_of(beats: list[BeatProcess], token: int) -> BeatProcess:
    wait_until(lambda: BeatNode.objects.filter(role="leader", token=token).exists(), 5,
               f"the health row of the leader with token {token}")
    pid = BeatNode.objects.get(role="leader", token=token).pid
    return next(beat for beat in beats if beat.pid == pid)


def assert_no_tick_twice(sent: list[Sent], beats) -> None:
    """Two sends of one 1 s entry less than half a period apart: a tick sent twice."""
    gaps = [round(b.at - a.at, 2) for a, b in itertools.pairwise(sent)]
    assert min(gaps, default=1.0) > 0.5, f"gaps {gaps}\n{logs(beats)}"


@pytest.mark.parametrize("backend", ["default", "redis", "zookeeper", "etcd"])
def test_one_leader_sends_each_tick_and_a_standby_takes_over_after_sigkill(
        beats, collector, backend):
    every_second("every-second", "beat_tests.tick", collector.queue_name)
    started = beats(count=3, beat={"LOCK_BACKEND": backend, "TTL": TTL})
    wait_sends(collector, 1, 60, started)

    # Steady state: one token, one send per 1 s tick, one leader among three.
    window_start = time.monotonic()
    time.sleep(4)
    steady = collector.between(window_start, window_start + 4)
    # One send per tick: never more; one fewer when a loaded machine makes a run late.
    assert 2 <= len(steady) <= 5, [round(s.at - window_start, 2) for s in steady]
    tokens = {sent.token for sent in collector.sent}
    assert len(tokens) == 1 and None not in tokens, tokens
    assert {sent.app for sent in collector.sent} == {"default"}
    assert len(fresh_leaders()) == 1, list(BeatNode.objects.values())
    old_token = tokens.pop()

    leader = leader_of(started, old_token)
    leader.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    bound = VALIDITY[backend] + TICK
    wait_until(lambda: any(sent.token != old_token for sent in collector.sent),
               bound + 10, "a send by a new leader")
    first_new = next(sent for sent in collector.sent if sent.token != old_token)
    failover = first_new.at - killed_at
    print(f"{backend}: failover {failover:.2f} s (bound {bound:.2f} s)")
    assert failover <= bound + SLACK, f"failover {failover:.2f} s\n{logs(started)}"

    time.sleep(2.5)
    after = collector.between(first_new.at, first_new.at + 2.5)
    # The runs missed while nobody led come as one send, then one per tick.
    assert 2 <= len(after) <= 4, [round(s.at - first_new.at, 2) for s in after]
    assert {sent.token for sent in after} == {first_new.token}
    assert first_new.token > old_token or backend == "redis"  # Redis: a new grant, same server
    assert_no_tick_twice(collector.sent, started)
    assert len(fresh_leaders()) == 1


def test_a_leader_paused_past_its_lease_sends_nothing_after_waking(beats, collector):
    every_second("every-second", "beat_tests.tick", collector.queue_name)
    started = beats(count=2, beat={"TTL": TTL})
    wait_sends(collector, 2, 60, started)
    old_token = collector.sent[-1].token
    leader = leader_of(started, old_token)

    leader.signal(signal.SIGSTOP)
    time.sleep(TTL + 2.5)  # past its lease: the standby leads meanwhile
    leader.signal(signal.SIGCONT)
    woke_at = time.monotonic()
    time.sleep(3)

    late = [sent for sent in collector.sent if sent.token == old_token and sent.at >= woke_at]
    assert late == [], f"the woken leader sent {len(late)} tick(s)\n{leader.log()[-3000:]}"
    assert any(sent.token != old_token for sent in collector.between(woke_at, woke_at + 3))
    assert_no_tick_twice(collector.sent, started)
    assert "no longer leading" in leader.log()
    assert len(fresh_leaders()) == 1


@pytest.fixture
def lock_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.remove()


def test_lock_server_stopped_under_the_leader(beats, collector, lock_server):
    every_second("every-second", "beat_tests.tick", collector.queue_name)
    started = beats(count=3, beat={"LOCK_BACKEND": "fault", "TTL": TTL},
                    env={"TEST_BEAT_FAULT_REDIS_URL": lock_server.url})
    wait_sends(collector, 2, 60, started)

    stopped_at = time.monotonic()
    lock_server.stop()
    time.sleep(TTL + 2)
    during = [round(s.at - stopped_at, 2) for s in collector.sent if s.at >= stopped_at]
    # It stops at its next renewal (TTL/10 + a tick), long before the lease could expire.
    assert all(at < TTL - TTL / 5 for at in during), during
    assert all(at < 1.5 for at in during), during

    lock_server.start()
    restarted_at = time.monotonic()
    wait_until(lambda: collector.between(restarted_at, float("inf")), 10 + TICK,
               "a send after the lock server came back")
    time.sleep(3)
    after = collector.between(restarted_at, float("inf"))
    assert len({sent.token for sent in after}) == 1, after
    assert_no_tick_twice(collector.sent, started)
    assert len(fresh_leaders()) == 1
    assert all(beat.alive() for beat in started)  # none exited over its lease


def test_each_app_sends_its_own_periodic_tasks_through_its_own_broker(beats):
    redis_side = Collector(settings.REDIS_URL).start()
    amqp_side = Collector(settings.AMQP_URL, queue=redis_side.queue_name).start()
    try:
        queue = redis_side.queue_name
        every_second("default-job", "beat_tests.default_job", queue)   # no route: default
        every_second("nightly", "reports.tasks.nightly", queue)       # TASK_APPS: global
        every_second("global-job", "beat_tests.global_job", queue)    # bound to global
        every_second("chosen", "beat_tests.chosen_job", queue)        # chosen in the admin:
        PeriodicTaskApp.objects.create(periodic_task="chosen", app_alias="global")
        started = beats("default", 2, beat={"TTL": TTL}) + beats("global", 2, beat={"TTL": TTL})
        wait_until(lambda: len(amqp_side.sent) >= 6 and len(redis_side.sent) >= 2, 60,
                   "sends on both brokers")
        time.sleep(2)
        on_redis = {(sent.task, sent.app) for sent in redis_side.sent}
        on_amqp = {(sent.task, sent.app) for sent in amqp_side.sent}
        assert on_redis == {("beat_tests.default_job", "default")}, logs(started)
        assert on_amqp == {("reports.tasks.nightly", "global"), ("beat_tests.global_job", "global"),
                           ("beat_tests.chosen_job", "global")}, logs(started)
        assert len(fresh_leaders("default")) == 1 and len(fresh_leaders("global")) == 1
    finally:
        redis_side.stop()
        amqp_side.stop()


#: Periodic task -> (task, its lock): a LockedTask and an @locked function task.
LOCKED = {"locked": ("beat_tests.locked_job", "beat-test-locked-job"),
          "decorated": ("beat_tests.locked_function", "beat-test-locked-function")}


def test_a_locked_periodic_task_is_skipped_while_its_lock_is_held(beats, collector):
    tasks = {name: every_second(name, task, collector.queue_name)
             for name, (task, _) in LOCKED.items()}
    started = beats(count=2, beat={"TTL": TTL})
    wait_until(lambda: {s.task for s in collector.sent} >= {t for t, _ in LOCKED.values()},
               60, "a send of each")

    with lock(LOCKED["locked"][1]), lock(LOCKED["decorated"][1]):  # the long-running ones
        held_at = time.monotonic()
        runs_before = {name: PeriodicTask.objects.get(pk=row.pk).total_run_count
                       for name, row in tasks.items()}
        time.sleep(4)
        released_at = time.monotonic()
    runs_while_held = {name: PeriodicTask.objects.get(pk=row.pk).total_run_count
                       - runs_before[name] for name, row in tasks.items()}
    time.sleep(3)

    log = "".join(beat.log() for beat in started)
    for name, (task, lock_name) in LOCKED.items():
        sent = [s for s in collector.sent if s.task == task]
        # One send may have been under way when the lock was taken.
        held = [s for s in sent if held_at + 0.5 <= s.at < released_at]
        assert held == [], (name, [round(s.at - held_at, 2) for s in held])
        assert runs_while_held[name] >= 3, name  # skipped runs count as done: no pile-up
        after = [s for s in sent if released_at <= s.at < released_at + 3]
        assert 2 <= len(after) <= 4, (name, [round(s.at - released_at, 2) for s in after])
        assert_no_tick_twice(sent, started)
        assert (f"skipped {name} ({task}): lock {lock_name!r} busy (all 1 slot(s) held); "
                f"held by host {HOSTNAME} (pid {os.getpid()})") in log, name
