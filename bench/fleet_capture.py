"""Record one real prefork worker's control replies as the fleet simulator's payloads.

Run once (it rewrites :data:`SAMPLE`)::

    env $(cat /work/iso/<you>.env) DJANGO_SETTINGS_MODULE=tests.settings \\
        .venv/bin/python -m bench.fleet_capture

It starts a real ``manage.py celery default worker -P prefork -c 2`` (the
test suite's own worker class), keeps one ``testapp.monitored_sleep`` task
running so that ``active`` and ``query_task`` have something to say, sends
every command the simulator answers through Celery's own ``inspect`` API (the
arguments Celery and Flower send) and stores each reply exactly as the worker
sent it, with the worker's hostname, pid and task id recorded beside them so
that :mod:`bench.fleet` can substitute its own. It also records the median
round trip of each of the reading's commands to this worker (idle but for
the task), the ground for the simulator's default latency.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent / "fleet_sample.json"


def capture() -> dict:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import celery
    import django

    django.setup()
    from tests.testapp.monitoring_tasks import monitored_sleep
    from tests.workers import WorkerProcess

    worker = WorkerProcess("default", tag="-capture").start()
    try:
        app = worker.app
        result = monitored_sleep.delay(30, note="captured")
        inspector = app.control.inspect(destination=[worker.name], timeout=2.0, limit=1)
        deadline = time.monotonic() + 20
        while not (inspector.active() or {}).get(worker.name):
            if time.monotonic() > deadline:
                raise SystemExit("the task never became active; see " + str(worker.log_path))
            time.sleep(0.1)

        def one(reply: dict | None, what: str):
            if not reply or worker.name not in reply:
                raise SystemExit(f"no reply to {what}: {reply!r}")
            return reply[worker.name]

        replies = {
            "ping": one(inspector.ping(), "ping"),
            "stats": one(inspector.stats(), "stats"),
            "active": one(inspector.active(), "active"),
            "active:safe": one(inspector.active(safe=True), "active(safe=True)"),
            "active_queues": one(inspector.active_queues(), "active_queues"),
            "registered": one(inspector.registered(), "registered"),
            "scheduled": one(inspector.scheduled(), "scheduled"),
            "reserved": one(inspector.reserved(), "reserved"),
            "revoked": one(inspector.revoked(), "revoked"),
            "conf": one(inspector.conf(), "conf"),
            "report": one(inspector.report(), "report"),
            "query_task": one(inspector.query_task(result.id), "query_task"),
            "hello": one(inspector.hello("capture@nowhere", revoked=[]), "hello"),
        }
        # What a worker answers to a command it does not know.
        unknown = app.control.broadcast("no_such_command", destination=[worker.name],
                                        reply=True, timeout=2.0, limit=1)
        replies["no_such_command"] = one(unknown[0] if unknown else None, "no_such_command")
        stats = replies["stats"]
        result.revoke(terminate=True)
        # What a reply costs a real worker, round trip from this process: the
        # ground for the simulator's default latency.
        round_trip = {}
        with app.connection_for_write() as connection:
            for command in ("ping", "stats", "active", "active_queues"):
                times = []
                for _ in range(21):
                    started = time.perf_counter()
                    getattr(app.control.inspect(destination=[worker.name], timeout=2.0,
                                                limit=1, connection=connection), command)()
                    times.append(time.perf_counter() - started)
                round_trip[command] = round(statistics.median(times) * 1000, 2)
        return {
            "about": "Control replies of one real prefork worker (bench/fleet_capture.py); "
                     "bench/fleet.py substitutes hostname, pids and task id.",
            "captured": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "celery": celery.__version__, "python": platform.python_version(),
            "hostname": worker.name, "pid": stats["pid"],
            "pool_pids": stats["pool"].get("processes", []),
            "task_id": result.id, "replies": replies,
            "round_trip_ms_median": round_trip,
        }
    finally:
        worker.stop()


def main() -> int:
    sample = capture()
    SAMPLE.write_text(json.dumps(sample, indent=1, sort_keys=True) + "\n")
    print(f"wrote {SAMPLE} ({SAMPLE.stat().st_size} bytes): {sorted(sample['replies'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
