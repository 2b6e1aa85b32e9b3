"""Makespan: 200 tasks of 50 ms through a capacity-4 semaphore on 8 worker processes.

Ideal: 200 x 0.05 s / 4 = 2.5 s. Side by side in one run: the default lock
policy (poll for a slot up to ``WAIT`` seconds in the worker, then retry with
countdown + jitter) against the seed's policy (retry at once with a fixed
``countdown=5``). Redis broker; the lock on Redis and on the database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

TASKS, SECONDS, CAPACITY, PROCESSES = 200, 0.05, 4, 8
ROOT = Path(__file__).resolve().parent.parent


def start_worker() -> subprocess.Popen:
    log = open(ROOT / "build" / "bench" / "makespan-worker.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "manage.py", "celery", "default", "worker", "-c", str(PROCESSES),
         "-P", "prefork", "-n", f"bench-{os.getpid()}@%h", "-l", "warning",
         "--without-gossip", "--without-mingle"],
        cwd=ROOT, env={**os.environ, "DJANGO_SETTINGS_MODULE": "bench.settings"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run(policy: dict, backend: str) -> float:
    from django_celery_adv.models import LockDefinition
    from tests.testapp.tasks import locked_sleep

    name = f"makespan-{uuid.uuid4().hex[:8]}"
    LockDefinition.objects.create(name=name, backend=backend, capacity=CAPACITY, **policy)
    start = time.perf_counter()
    results = [locked_sleep.delay(name, SECONDS) for _ in range(TASKS)]
    for result in results:
        result.get(timeout=600)
    return time.perf_counter() - start


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django

    django.setup()
    import redis
    from django.conf import settings
    from django.core.management import call_command

    from bench.report import DATABASES, database, write_section
    from django_celery_adv.locks.api import POLL_MAX, POLL_MIN
    from django_celery_adv.registry import apps

    call_command("migrate", verbosity=0)
    (ROOT / "build" / "bench").mkdir(parents=True, exist_ok=True)
    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    from django_celery_adv import conf

    lock_defaults = conf.get("LOCK_DEFAULTS")
    default_policy = {"ttl": lock_defaults["TTL"], "wait": lock_defaults["WAIT"],
                      "retry_countdown": lock_defaults["RETRY_COUNTDOWN"],
                      "retry_jitter": lock_defaults["RETRY_JITTER"],
                      "retry_backoff": lock_defaults["RETRY_BACKOFF"]}
    seed_policy = {"ttl": 60, "wait": 0, "retry_countdown": 5, "retry_jitter": 0}
    worker = start_worker()
    try:
        deadline = time.monotonic() + 60
        while not apps["default"].control.inspect(timeout=0.5, limit=1).ping():
            if time.monotonic() > deadline:
                raise SystemExit("benchmark worker did not start; see build/bench/")
        ideal = TASKS * SECONDS / CAPACITY
        default_seconds = {}
        rows = ["| lock backend | policy | makespan (s) | x ideal |", "|---|---|---|---|"]
        for backend in ("redis", "default"):
            for label, policy in (("default (wait in worker, then countdown + jitter)",
                                   default_policy),
                                  ("seed: retry with fixed countdown=5", seed_policy)):
                seconds = run(policy, backend)
                if policy is default_policy:
                    default_seconds[backend] = seconds
                rows.append(f"| {backend} | {label} | {seconds:.2f} | {seconds / ideal:.2f}x |")
                print(rows[-1], flush=True)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
    db = database()
    write_section(
        f"makespan-{db}", f"Makespan through a capacity-4 semaphore ({DATABASES[db]} database)",
        "\n".join(rows) + f"\n\n{TASKS} tasks of {SECONDS * 1000:.0f} ms, capacity {CAPACITY}, "
        f"one worker with {PROCESSES} prefork processes, Redis broker. Ideal = "
        f"{ideal:.1f} s; target <= 1.3x ideal with the default settings. Default policy: "
        f"WAIT={lock_defaults['WAIT']} s of polling for a slot inside the worker "
        f"({POLL_MIN * 1000:.0f} ms doubling to {POLL_MAX * 1000:.0f} ms, jittered), "
        f"then a retry after RETRY_COUNTDOWN="
        f"{lock_defaults['RETRY_COUNTDOWN']} s + up to RETRY_JITTER="
        f"{lock_defaults['RETRY_JITTER']} s. `default` = the database lock backend on "
        f"{DATABASES[db]} (bench/settings.py: SQLite in WAL mode, PostgreSQL, or MariaDB "
        "at REPEATABLE READ, the backend's own connection at READ COMMITTED); the Redis "
        "rows run in the same run on the same machine. One run per row.\n",
        {"database_s": default_seconds["default"], "redis_s": default_seconds["redis"],
         "ideal_s": ideal})
    return 0


if __name__ == "__main__":
    sys.exit(main())
