"""Status of several apps: ``inspect_all`` vs what an operator runs today, and the admin page.

Side by side in one run, interleaved so that drift hits every variant alike:

1. 3 apps (Redis, RabbitMQ, a second app on the same Redis) x 2 workers each,
   all answering: ``inspect_all()`` (warm: the workers of the previous reading
   are known) against ``manage.py celery <alias> inspect ping`` run once per
   app as a subprocess, and against Celery's in-process API
   (``app.control.inspect().ping()`` per app, with and without ``limit=``).
2. The admin workers page with 3 apps x 2 and 3 apps x 10 real workers:
   server time (Django's test client, in process) and SQL queries per request.

Workers are real processes on the solo pool (one process each, so that 30
of them fit on a 2-core machine).
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALIASES = ("default", "global", "twin")
FAST_ROUNDS = int(os.environ.get("BENCH_INSPECT_ROUNDS", "30"))
SLOW_ROUNDS = int(os.environ.get("BENCH_INSPECT_SLOW_ROUNDS", "5"))
PAGE_ROUNDS = int(os.environ.get("BENCH_PAGE_ROUNDS", "20"))


def setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


class Workers:
    """Solo-pool worker processes started in parallel, stopped together."""

    def __init__(self) -> None:
        self.processes: dict[str, subprocess.Popen] = {}
        self.names: dict[str, list[str]] = {alias: [] for alias in ALIASES}
        (ROOT / "build" / "bench").mkdir(parents=True, exist_ok=True)

    def start(self, per_app: int, timeout: float = 180.0) -> None:
        """Grow every app to ``per_app`` workers and wait until all of them answer."""
        from django_celery_adv.monitoring import inspect_all

        log = open(ROOT / "build" / "bench" / "inspect-workers.log", "ab")  # noqa: SIM115
        for alias in ALIASES:
            while len(self.names[alias]) < per_app:
                name = f"bench{len(self.names[alias])}-{alias}-{os.getpid()}@{socket.gethostname()}"
                self.processes[name] = subprocess.Popen(
                    [sys.executable, "manage.py", "celery", alias, "worker", "-P", "solo",
                     "-n", name, "-l", "warning", "--without-gossip", "--without-mingle"],
                    cwd=ROOT, env={**os.environ, "DJANGO_SETTINGS_MODULE": "bench.settings"},
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                self.names[alias].append(name)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            statuses = inspect_all(timeout=1.0, max_age=0)
            missing = [name for alias in ALIASES for name in self.names[alias]
                       if not (statuses[alias].worker(name) and
                               statuses[alias].worker(name).online)]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"workers did not start: {missing}; see build/bench/")
            time.sleep(0.5)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- part 1: the status of 3 apps -------------------------------------------------

def ours() -> None:
    from django_celery_adv.monitoring import inspect_all

    statuses = inspect_all(max_age=0)  # a fresh reading, never the shared one
    assert all(len(status.online) >= 2 for status in statuses.values()), statuses


def cli_per_app() -> None:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "bench.settings"}
    for alias in ALIASES:
        result = subprocess.run([sys.executable, "manage.py", "celery", alias, "inspect", "ping"],
                                cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        assert "pong" in result.stdout, result.stdout + result.stderr


def api_per_app(limit: int | None) -> Callable[[], None]:
    def run() -> None:
        from django_celery_adv.registry import apps

        for alias in ALIASES:
            assert len(apps[alias].control.inspect(timeout=1.0, limit=limit).ping() or {}) >= 2

    return run


def compare_status() -> list[str]:
    variants = {"ours": (ours, FAST_ROUNDS), "cli": (cli_per_app, SLOW_ROUNDS),
                "api": (api_per_app(None), SLOW_ROUNDS), "api_limit": (api_per_app(2), FAST_ROUNDS)}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    ours()  # the discovery reading: from here on the workers are known
    for fn, _ in variants.values():
        fn()  # warm up connections
    per_round = {name: max(1, rounds // SLOW_ROUNDS) for name, (_, rounds) in variants.items()}
    for _ in range(SLOW_ROUNDS):
        for name, (fn, _) in variants.items():
            samples[name].extend(timed(fn) for _ in range(per_round[name]))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    ours_s = medians["ours"]
    labels = {
        "ours": "`inspect_all(max_age=0)`: stats+active_queues, 3 apps concurrently",
        "cli": "`manage.py celery <alias> inspect ping`, one subprocess per app (operator today)",
        "api": "`app.control.inspect().ping()` per app, in process, sequential",
        "api_limit": "`app.control.inspect(limit=2).ping()` per app, in process, sequential",
    }
    rows = ["| variant | rounds | median (s) | time / `inspect_all` time |", "|---|---|---|---|"]
    for name in ("ours", "cli", "api", "api_limit"):
        ratio = medians[name] / ours_s
        rows.append(f"| {labels[name]} | {len(samples[name])} | {medians[name]:.3f} | "
                    f"{ratio:.2f}x |")
        print(rows[-1], flush=True)
    return rows


# -- part 2: the admin workers page --------------------------------------------------

def measure_page(per_app: int) -> tuple[float, float, int, int]:
    """(median s, max s, queries per request, workers listed) of the workers page."""
    from django.contrib.auth.models import Permission, User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from django.urls import reverse

    user, _ = User.objects.get_or_create(username="bench-operator",
                                         defaults={"is_staff": True})
    user.user_permissions.add(Permission.objects.get(codename="view_monitoring"))
    client = Client()
    client.force_login(user)
    url = reverse("admin:django_celery_adv_monitoring_changelist")
    client.get(url)  # warm: templates compiled, workers known
    times, queries = [], set()
    for _ in range(PAGE_ROUNDS):
        with CaptureQueriesContext(connection) as captured:
            start = time.perf_counter()
            response = client.get(url)
            times.append(time.perf_counter() - start)
        assert response.status_code == 200
        queries.add(len(captured))
    listed = response.content.decode().count('class="dca-worker dca-online"')
    assert listed >= per_app * len(ALIASES), listed
    assert len(queries) == 1, queries
    return statistics.median(times), max(times), queries.pop(), listed


def main() -> int:
    setup_django()
    import redis
    from django.conf import settings
    from django.db import connection

    from bench.report import write_section
    from django_celery_adv.registry import apps

    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    for alias in ALIASES:
        apps[alias].control.purge()
    workers = Workers()
    try:
        workers.start(per_app=2)
        status_rows = compare_status()
        page = {2: measure_page(2)}
        workers.start(per_app=10)
        page[10] = measure_page(10)
    finally:
        workers.stop()

    page_rows = ["| workers (3 apps x N) | workers listed | median (s) | max (s) | SQL queries |",
                 "|---|---|---|---|---|"]
    for per_app, (median, worst, queries, listed) in page.items():
        page_rows.append(f"| 3 x {per_app} | {listed} | {median:.3f} | {worst:.3f} | {queries} |")
        print(page_rows[-1], flush=True)
    vendor = connection.vendor
    write_section(
        f"inspect-all-{vendor}", f"Status of several apps: `inspect_all` and the admin "
        f"workers page ({vendor} database)",
        "Three apps: `default` (Redis), `global` (RabbitMQ), `twin` (a second app on the "
        "same Redis database), each with 2 real solo-pool workers, all answering.\n\n"
        + "\n".join(status_rows)
        + "\n\nTarget: `inspect_all()` <= 0.3 s median and >= 10x faster than the operator's "
        "per-app `inspect ping`. `inspect_all` asks four commands, not one, and still ends "
        "as soon as every worker of the previous reading has answered (plus a grace "
        "for newcomers: as long again as the known workers took, at least 20 ms); "
        "Celery's `inspect` waits a quiet period of its timeout (1 s) after the last "
        "reply unless `limit=` is given (celery #5916), and a "
        "subprocess adds Python, Django and Celery start-up. The last row is the fastest "
        "thing Celery's API can do when the worker count is known in advance: one "
        "command (ping only, no stats/active/queues), no discovery of new workers, apps "
        "one after another.\n\n"
        "Admin workers page (`GET /admin/django_celery_adv/monitoring/`, Django's test "
        f"client in process, {PAGE_ROUNDS} requests each, real workers: 3 x 10 = 30 "
        "solo-pool processes):\n\n" + "\n".join(page_rows)
        + "\n\nTarget: <= 0.5 s server time with 3 x 10 workers; SQL queries independent "
        "of the number of workers (session and user only).\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
