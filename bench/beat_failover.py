"""Beat failover after SIGKILL of the leader: LockedScheduler on each lock backend
vs celery-redbeat, side by side in one run, same lock timeout and max interval.

    .venv/bin/pip install -e '.[all,bench]'      # celery-redbeat
    .venv/bin/python -m bench.beat_failover      # BENCH_FAILOVERS=5 by default

Each variant runs three beats of the ``default`` app with a 1 s interval task,
counted at the broker (no worker). Five times: 3 s of steady state, SIGKILL of
the leader, time to the first send after the kill, a fresh beat started to keep
three. Ours: ``BEAT = {"LOCK_BACKEND": <backend>, "TTL": 10}`` (max interval
TTL/4 = 2.5 s); redbeat: ``redbeat_lock_timeout = 10``, ``beat_max_loop_interval
= 2.5``. Duplicates are two sends of the 1 s entry less than 0.5 s apart; missed
ticks are the whole seconds a gap between sends lasted beyond the first.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import signal
import statistics
import time

TTL = 10.0
MAX_INTERVAL = TTL / 4
FAILOVERS = int(os.environ.get("BENCH_FAILOVERS", "5"))
BACKENDS = ["default", "redis", "zookeeper", "etcd"]
BACKEND_NAMES = {"default": "database"}


def setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def beat_env(variant: str, queue: str) -> dict:
    """Env of the beat processes of one variant (see tests/beat_settings.py)."""
    env = {"TEST_BEAT_BASE_SETTINGS": "bench.settings", "TEST_USE_TEST_DB": ""}
    if variant == "redbeat":
        from django.conf import settings

        env["TEST_BEAT_EXTRA_APP_SETTINGS"] = json.dumps({
            "redbeat_redis_url": settings.REDIS_LOCK_URL,
            # One prefix (so one lock) for the beats of a run; none left from the last.
            "redbeat_key_prefix": f"bench-redbeat-{queue}",
            "redbeat_lock_timeout": TTL, "beat_max_loop_interval": MAX_INTERVAL,
            "beat_schedule": {"bench-tick": {"task": "bench.tick", "schedule": 1.0,
                                             "options": {"queue": queue}}}})
    return env


def start_beat(variant: str, queue: str, tag: str):
    from tests.beats import BeatProcess

    beat = BeatProcess("default", f"bench-{variant}-{tag}",
                       beat={"LOCK_BACKEND": variant, "TTL": TTL},
                       env=beat_env(variant, queue))
    if variant == "redbeat":
        beat.scheduler = "redbeat.RedBeatScheduler"
    return beat.start()


def leader(variant: str, beats: list, last_token: int | None):
    """The beat that leads now: the health row of the token last sent (ours), or
    the one live beat that logged taking redbeat's lock."""
    if variant == "redbeat":
        owners = [beat for beat in beats if beat.alive() and "Acquired lock" in beat.log()]
        return owners[0] if len(owners) == 1 else None
    from django_celery_adv.models import BeatNode

    row = BeatNode.objects.filter(role="leader", token=last_token).first()
    return next((beat for beat in beats if row and beat.pid == row.pid and beat.alive()), None)


def run_variant(variant: str) -> dict:
    from django.conf import settings
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from django_celery_adv.models import BeatNode
    from tests.beats import Collector
    from tests.faults.servers import wait_until

    collector = Collector(settings.REDIS_URL).start()
    PeriodicTask.objects.all().delete()
    BeatNode.objects.all().delete()
    if variant != "redbeat":
        interval, _ = IntervalSchedule.objects.get_or_create(every=1, period="seconds")
        PeriodicTask.objects.create(name="bench-tick", task="bench.tick", interval=interval,
                                    queue=collector.queue_name)
    beats = [start_beat(variant, collector.queue_name, str(i)) for i in range(3)]
    failovers: list[float] = []
    try:
        wait_until(lambda: collector.sent, 90, f"{variant}: a first send")
        for round_ in range(FAILOVERS):
            time.sleep(3)
            wait_until(lambda: leader(variant, beats, collector.sent[-1].token) is not None,
                       30, f"{variant}: the leader")
            leader(variant, beats, collector.sent[-1].token).signal(signal.SIGKILL)
            killed_at = time.monotonic()
            beats.append(start_beat(variant, collector.queue_name, f"r{round_}"))
            after_kill = functools.partial(collector.between, killed_at, float("inf"))
            wait_until(after_kill, TTL * 10, f"{variant}: a send after the kill")
            failovers.append(after_kill()[0].at - killed_at)
        time.sleep(2)
    finally:
        for beat in beats:
            beat.signal(signal.SIGTERM)
        for beat in beats:
            beat.stop()
        collector.stop()
    sent = collector.sent
    gaps = [b.at - a.at for a, b in itertools.pairwise(sent)]
    return {"failovers": failovers, "median": statistics.median(failovers),
            "duplicates": sum(gap < 0.5 for gap in gaps),
            "missed": sum(max(round(gap) - 1, 0) for gap in gaps), "sends": len(sent)}


def main() -> None:
    setup()
    from bench.report import write_section

    results = {}
    for variant in [*BACKENDS, "redbeat"]:
        results[variant] = run_variant(variant)
        print(variant, json.dumps(results[variant]), flush=True)
    rows = ["| scheduler | lock | failover median (s) | min-max (s) | duplicates | "
            "missed ticks | sends |", "|---|---|---:|---:|---:|---:|---:|"]
    for variant, r in results.items():
        who = ("celery-redbeat 2", "Redis lock") if variant == "redbeat" else \
            ("LockedScheduler", f"{BACKEND_NAMES.get(variant, variant)} backend")
        rows.append(f"| {who[0]} | {who[1]} | {r['median']:.1f} | {min(r['failovers']):.1f}-"
                    f"{max(r['failovers']):.1f} | {r['duplicates']} | {r['missed']} | "
                    f"{r['sends']} |")
    body = (f"Three beats of one app, a 1 s interval task counted at the broker; "
            f"{FAILOVERS} times SIGKILL of the leader, time to the next send. Same lock "
            f"timeout ({TTL:g} s) and max interval ({MAX_INTERVAL:g} s) for both "
            "(`python -m bench.beat_failover`). Missed ticks are the seconds without a send "
            "while no beat led (their runs come as one coalesced send). ZooKeeper frees a "
            "dead leader's lease when its session expires (4 s session in these settings), "
            "not after the TTL. celery-redbeat's own default lock timeout is 5 x max "
            "interval: with its default max interval of 300 s, 1,500 s (stated, not run).\n\n"
            + "\n".join(rows))
    write_section("beat-failover", "Beat failover after SIGKILL of the leader", body)


if __name__ == "__main__":
    main()
