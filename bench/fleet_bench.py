"""Reading a fleet of 10 to 2,000 workers: ``inspect_all`` vs Celery's ``inspect`` vs Flower.

Side by side in one run, interleaved round by round, against simulated fleets
(:mod:`bench.fleet`: one subprocess per app answering as N workers, with the
payloads of a real prefork worker and a lognormal reply latency):

* one app (``default``, Redis) and three apps (``default`` and ``twin`` on
  one Redis, ``global`` on RabbitMQ), N workers per app, N = 10, 100, 300,
  1,000, 2,000 (``BENCH_FLEET_SIZES``);
* ``django_celery_adv.monitoring.inspect_all(aliases, timeout=1.0)``, a
  repeat reading (the previous reading's workers are known), whatever
  version of it is installed;
* Celery's ``app.control.inspect(timeout=1.0).stats()``, the apps in parallel
  threads;
* Flower 2.x ``GET /api/workers?refresh=1``, one real ``flower`` process per
  app (``manage.py celery <alias> flower``, ``--inspect_timeout=1000``), the
  apps requested in parallel.

Each cell: median wall time of ``BENCH_FLEET_ROUNDS`` readings, workers
complete / expected in the worst of them, and the CPU seconds of the reading
process (this process for ours and Celery's; the Flower processes for
Flower), median per reading. Complete means: ours, the worker is online and
has every field that any worker of the reading has; Celery, a ``stats``
reply; Flower, every method its fleet-wide refresh asks (Flower 2.2:
``stats``, ``active_queues``, ``registered``, ``conf``) present and updated by this
refresh (Flower keeps earlier replies, so its count is an upper bound).
Ours reads fresh each time (``max_age=0`` where ``inspect_all`` has it).

The fleets use a Redis server of their own on a spare port
(tests/faults/servers.py) and the RabbitMQ vhost of the benchmark settings.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIZES = [int(n) for n in os.environ.get("BENCH_FLEET_SIZES", "10,100,300,1000,2000").split(",")]
ROUNDS = int(os.environ.get("BENCH_FLEET_ROUNDS", "3"))
LATENCY = os.environ.get("BENCH_FLEET_LATENCY", "lognormal:0.003,0.6")
TIMEOUT = 1.0
#: A simulator this far behind its schedule may be what a reading missed (cells marked).
LAG_LIMIT = 0.5
ONE_APP = ("default",)
THREE_APPS = ("default", "twin", "global")
VARIANTS = {
    "ours": "`inspect_all(timeout=1)`, repeat reading (fresh)",
    "celery": "Celery `inspect(timeout=1).stats()`",
    "flower": "Flower `/api/workers?refresh=1`",
}


def setup() -> Any:
    """Our own Redis on a spare port, then Django on the benchmark settings."""
    from tests.faults.servers import spare_port

    port = spare_port()
    url = f"redis://127.0.0.1:{port}/0"
    os.environ["TEST_REDIS_URL"] = os.environ["TEST_REDIS_LOCK_URL"] = url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django

    django.setup()
    from django.core.management import call_command

    from tests.faults.servers import RedisServer

    call_command("migrate", verbosity=0)  # the seen-workers record is in the database
    return RedisServer(port).start()


def flower_methods() -> tuple[str, ...]:
    """The inspect methods the installed Flower's fleet-wide refresh asks for.

    Flower 2.2 leaves the task lists (``scheduled``, ``active``, ``reserved``,
    ``revoked``) to the one-worker page; older 2.x versions ask all eight.
    """
    from flower.inspector import Inspector

    methods = getattr(Inspector, "inspect_methods", None) or Inspector.methods
    skipped = getattr(Inspector, "task_inspect_methods", ())
    return tuple(method for method in methods if method not in skipped)


def flower_version() -> str:
    from importlib.metadata import version

    return version("flower")


def code_version() -> str:
    """The commit measured: ``BENCH_COMMIT``, else git's HEAD (+ whether the package differs)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "django_celery_adv"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} with uncommitted changes in django_celery_adv/" if dirty else head


def cpu_of(pid: int) -> float:
    """utime + stime of a process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Flower:
    """One ``flower`` process for one app, its HTTP API open on a spare port."""

    def __init__(self, alias: str) -> None:
        from tests.faults.servers import spare_port, wait_until

        self.alias = alias
        self.port = spare_port()
        log_dir = ROOT / "build" / "bench"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / f"flower-{alias}.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "celery", alias, "flower", "--address=127.0.0.1",
                 f"--port={self.port}", f"--inspect_timeout={int(TIMEOUT * 1000)}",
                 "--persistent=False", "--logging=error"],
                cwd=ROOT, env={**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._up, 60, f"flower for {alias} on {self.port}", interval=0.2)

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"flower for {self.alias} exited; see build/bench/")
        with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}/api/workers", timeout=2) as response:
            return response.status == 200
        return False

    def refresh(self) -> bytes:
        url = f"http://127.0.0.1:{self.port}/api/workers?refresh=1"
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.read()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 15)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)


def in_threads(fn: Callable[[str], Any], aliases: tuple[str, ...]) -> dict[str, Any]:
    results: dict[str, Any] = {}

    def run(alias: str) -> None:
        try:
            results[alias] = fn(alias)
        except Exception as e:  # one app's failure is a row of the table, not a crash
            results[alias] = e

    threads = [threading.Thread(target=run, args=(alias,)) for alias in aliases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def ours(aliases: tuple[str, ...], names: dict[str, set[str]]) -> tuple[float, int, float]:
    """One fresh reading (never a shared one: ``max_age=0`` where there is such a thing)."""
    from django_celery_adv.monitoring import inspect_all

    fresh = {"max_age": 0} if "max_age" in inspect.signature(inspect_all).parameters else {}
    cpu, start = time.process_time(), time.perf_counter()
    statuses = inspect_all(aliases, timeout=TIMEOUT, **fresh)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    complete = 0
    for alias, status in statuses.items():
        online = [w for w in status.online if w.name in names[alias]]
        if online and hasattr(online[0], "unread"):  # says itself what it did not read
            complete += sum(not w.unread for w in online)
            continue
        fields = ("concurrency", "pool", "active", "queues")
        required = [f for f in fields if any(getattr(w, f) is not None for w in online)]
        complete += sum(all(getattr(w, f) is not None for f in required) for w in online)
    return elapsed, complete, cpu


def celery_inspect(aliases: tuple[str, ...],
                   names: dict[str, set[str]]) -> tuple[float, int, float]:
    from django_celery_adv.registry import apps

    def read(alias: str) -> dict:
        return apps[alias].control.inspect(timeout=TIMEOUT).stats() or {}

    cpu, start = time.process_time(), time.perf_counter()
    results = in_threads(read, aliases)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    complete = sum(len(set(result) & names[alias]) for alias, result in results.items()
                   if isinstance(result, dict))
    return elapsed, complete, cpu


def flower(flowers: dict[str, Flower], aliases: tuple[str, ...],
           names: dict[str, set[str]]) -> tuple[float, int, float]:
    methods = flower_methods()
    pids = [flowers[alias].process.pid for alias in aliases]
    cpu, wall = sum(cpu_of(pid) for pid in pids), time.time()
    start = time.perf_counter()
    results = in_threads(lambda alias: flowers[alias].refresh(), aliases)
    elapsed = time.perf_counter() - start
    cpu = sum(cpu_of(pid) for pid in pids) - cpu
    complete = 0
    for alias, body in results.items():
        if not isinstance(body, bytes):
            continue
        for name, info in json.loads(body).items():
            complete += (name in names[alias] and info.get("timestamp", 0) >= wall
                         and all(method in info for method in methods))
    return elapsed, complete, cpu


def fleet_lag(fleets: dict[str, Any], aliases: tuple[str, ...]) -> float:
    """The simulators' worst lag since the last call (waits for their backlog)."""
    lags = []
    for alias in aliases:
        try:
            lags.append(fleets[alias].counters(reset=True)["max_lag"])
        except TimeoutError:  # a saturated fleet: its lag is unknown, not zero
            lags.append(float("nan"))
    # max() would keep or drop a NaN by its place in the list: unknown wins.
    return float("nan") if any(math.isnan(lag) for lag in lags) else max(lags)


def measure(aliases: tuple[str, ...], names: dict[str, set[str]],
            flowers: dict[str, Flower], fleets: dict[str, Any]) -> dict[str, dict[str, float]]:
    expected = sum(len(names[alias]) for alias in aliases)
    runs: dict[str, Callable[[], tuple[float, int, float]]] = {
        "ours": lambda: ours(aliases, names),
        "celery": lambda: celery_inspect(aliases, names),
        "flower": lambda: flower(flowers, aliases, names),
    }
    runs["ours"]()  # the discovery reading: from here on the workers are known
    fleet_lag(fleets, aliases)
    samples: dict[str, list[tuple[float, int, float]]] = {name: [] for name in runs}
    lags: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            samples[name].append(run())
            lags[name].append(fleet_lag(fleets, aliases))
    summary = {}
    for name, values in samples.items():
        summary[name] = {"median_s": statistics.median(v[0] for v in values),
                         "complete_min": min(v[1] for v in values),
                         "complete_max": max(v[1] for v in values), "expected": expected,
                         "cpu_s": statistics.median(v[2] for v in values),
                         "fleet_lag_s": max(lags[name])}
        print(f"  {len(aliases)} app(s), {name}: {summary[name]}", flush=True)
    return summary


def cell(result: dict[str, float]) -> str:
    low, high, expected = result["complete_min"], result["complete_max"], result["expected"]
    complete = f"{low:,}" if low == high else f"{low:,}\u2013{high:,}"
    if low < expected:
        complete = f"**{complete}**"
    # An unknown lag (NaN: the simulator was too busy to say) is marked too.
    mark = "" if result["fleet_lag_s"] <= LAG_LIMIT else " \u2020"
    return (f"{result['median_s']:.3f} s, {complete}/{expected:,}, "
            f"{result['cpu_s']:.2f} CPU s{mark}")


def main() -> int:
    redis_server = setup()
    from bench.report import database, write_section
    from django_celery_adv.monitoring import forget_workers
    from django_celery_adv.registry import apps
    from tests.fleet import make_fleet

    results: dict[str, dict[int, dict]] = {"1": {}, "3": {}}
    started = time.monotonic()
    for alias in THREE_APPS:
        with apps[alias].connection_for_write() as connection:
            apps[alias].control.purge(connection=connection)
    flowers = {alias: Flower(alias) for alias in THREE_APPS}
    try:
        for size in SIZES:
            print(f"N = {size}", flush=True)
            forget_workers(THREE_APPS)
            fleets = {alias: make_fleet(alias, size, latency=LATENCY, prefix="sim",
                                        log_path=ROOT / "build" / "bench" / f"fleet-{alias}.log")
                      for alias in THREE_APPS}
            try:
                for fleet in fleets.values():
                    fleet.start()
                names = {alias: set(fleet.hostnames) for alias, fleet in fleets.items()}
                results["1"][size] = measure(ONE_APP, names, flowers, fleets)
                results["3"][size] = measure(THREE_APPS, names, flowers, fleets)
            finally:
                counters = [fleet.stop() or {} for fleet in fleets.values()]
            errors = [e for c in counters for e in c.get("errors", [])]
            if errors:
                raise SystemExit(f"the simulated fleet failed: {errors}")
    finally:
        for process in flowers.values():
            process.stop()
        redis_server.remove()
    took = time.monotonic() - started

    sections = []
    for key in ("1", "3"):
        label = "one app (`default`, Redis)" if key == "1" else \
            "three apps (`default` + `twin` on Redis, `global` on RabbitMQ), N each"
        rows = [f"| {label} | " + " | ".join(f"N = {n:,}" for n in SIZES) + " |",
                "|---|" + "---|" * len(SIZES)]
        for name, title in VARIANTS.items():
            rows.append(f"| {title} | " + " | ".join(cell(results[key][n][name])
                                                      for n in SIZES) + " |")
        rows.append("| simulator's worst lag behind schedule while ours / Celery / Flower "
                    "read | " + " | ".join(" / ".join(
                        f"{results[key][n][name]['fleet_lag_s'] * 1000:.0f}"
                        for name in VARIANTS) + " ms" for n in SIZES) + " |")
        sections.append("\n".join(rows))
    body = (
        f"Code measured: {code_version()}. "
        "Simulated fleets (`bench/fleet.py`: one subprocess per app answering as N workers "
        "with a real prefork worker's recorded replies, reply latency "
        f"`{LATENCY}` per worker and command) on a Redis server of the benchmark's own and "
        "RabbitMQ. Each cell: median time of "
        f"{ROUNDS} readings, workers complete / expected (worst\u2013best reading; bold when "
        "a reading missed any), CPU seconds of the reading process per reading (ours and "
        "Celery: the benchmark process; Flower: its server process). Variants interleaved "
        "round by round; every reader waits at most 1 s. Complete: ours, online with every "
        "field the reading asks for (no command in its `unread`); Celery, a `stats` reply; "
        f"Flower {flower_version()}, every method its fleet-wide refresh asks "
        f"({', '.join(f'`{m}`' for m in flower_methods())}) present and updated by this "
        "refresh (Flower keeps earlier replies: an upper bound). Ours reads fresh "
        "(`max_age=0`: no reuse of a shared reading) and stores the seen-workers record in "
        "the benchmark's database as it does in production.\n\n"
        + "\n\n".join(sections)
        + "\n\nThe simulator's lag is how late its last reply went out against the latency "
        "schedule (it shares the 2 cores with the readers): the fleet kept up where it is "
        "small next to the reading's time. \u2020: the simulator was more than "
        f"{LAG_LIMIT} s behind during that reader's readings (or too busy to say), so "
        "what it missed there may be the simulator's doing rather than the reader's. "
        f"Whole matrix: {took:.0f} s.\n\n"
        "Targets (issue 14): 1,000 workers complete in <= 0.3 s and 2,000 in <= 0.5 s on "
        "Redis; zero incomplete readings below the timeout.\n")
    data = {key: {str(n): {name: {k: round(v, 4) for k, v in r.items()}
                           for name, r in by_n.items()}
                  for n, by_n in per.items()} for key, per in results.items()}
    vendor = database()
    write_section(f"fleet-{vendor}", "Reading a fleet of 10 to 2,000 workers: `inspect_all`, "
                  f"Celery `inspect`, Flower ({vendor} database)", body, data=data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
