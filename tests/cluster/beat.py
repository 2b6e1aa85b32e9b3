"""Beat under cluster faults: two ``celery beat -S django_celery_adv`` processes, one
per client host, leading through the ZooKeeper or etcd cluster.

    run_beats("zookeeper", ["partition-client", ...], seed=1) -> result

One periodic task every ``interval`` seconds goes to a queue of its own on the
shared Redis (through the relay), where a collector in the root namespace
receives each message. Both beats' schedule is the same PostgreSQL database
(``<CLUSTER_PG_NAME>_beat``, migrated once). ZooKeeper: both beats use the
ensemble; etcd: each beat talks to its host's node (``EtcdBackend`` takes one).
The check: sends closer together than half the interval are duplicates (must
be 0: one send per tick); the longest gap between sends during each fault and
its recovery is the failover time seen by the consumer.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from kombu import Connection, Exchange, Queue

from . import nemesis, store, topology

HOSTS = {"beat1": ("c1", "etcd1"), "beat2": ("c2", "etcd2")}
#: Leadership lease TTL of the beats (their tick is TTL/4).
TTL = 6.0


def available() -> bool:
    """True once ``LockedScheduler`` is in the repository (committed, not a work in
    progress in the tree); read as text: importing it needs Django settings."""
    source = topology.REPO / "django_celery_adv" / "beat" / "scheduler.py"
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(source)],
                             cwd=topology.REPO, capture_output=True, check=False)
    return (tracked.returncode == 0 and source.exists()
            and "class LockedScheduler" in source.read_text())


class Collector(threading.Thread):
    """Receives every message of one queue; records arrival (monotonic) and token."""

    def __init__(self, url: str, queue: str) -> None:
        super().__init__(daemon=True, name="beat-collector")
        self.url, self.queue = url, Queue(queue, Exchange(queue, type="direct"), routing_key=queue)
        self.sent: list[tuple[float, int | None]] = []
        self.stopping, self.ready = threading.Event(), threading.Event()

    def run(self) -> None:
        with Connection(self.url) as conn, conn.Consumer(self.queue, callbacks=[self.on_message],
                                                         accept=["json"]):
            self.ready.set()
            while not self.stopping.is_set():
                with contextlib.suppress(TimeoutError, socket.timeout):
                    conn.drain_events(timeout=0.2)

    def on_message(self, body: Any, message: Any) -> None:
        token = (message.headers or {}).get("x-beat-token")
        self.sent.append((time.monotonic(), None if token is None else int(token)))
        message.ack()


def _env(run: dict[str, Any], *, root: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEST_USE")}
    env.update(DJANGO_SETTINGS_MODULE="tests.cluster.beat_settings",
               JEPSEN_BEAT=json.dumps(run), JEPSEN_ROOT="1" if root else "0",
               PYTHONPATH=str(topology.REPO))
    return env


def prepare(run: dict[str, Any], interval: float) -> None:
    """Create and migrate the schedule database; one periodic task for this run."""
    store.create_database(run["database"])
    manage = [sys.executable, str(topology.REPO / "manage.py")]
    subprocess.run([*manage, "migrate", "-v", "0"], env=_env(run, root=True), check=True,
                   cwd=topology.REPO, timeout=300)
    code = (
        "import django; django.setup()\n"
        "from django_celery_beat.models import IntervalSchedule, PeriodicTask\n"
        "PeriodicTask.objects.filter(name__startswith='jepsen-').delete()\n"
        f"every, _ = IntervalSchedule.objects.get_or_create(every={interval}, period='seconds')\n"
        f"PeriodicTask.objects.create(name={run['queue']!r}, task='jepsen.tick', "
        f"interval=every, queue={run['queue']!r})\n")
    subprocess.run([sys.executable, "-c", code], env=_env(run, root=True), check=True,
                   cwd=topology.REPO, timeout=120)


def leader_pid(backend: str, run: dict[str, Any]) -> int | None:
    """The pid of the beat holding the leadership lease ``beat.default``, if any."""
    from django_celery_adv.locks.backends.base import LockBackend
    from django_celery_adv.locks.backends.etcd import EtcdBackend
    from django_celery_adv.locks.backends.zookeeper import ZooKeeperBackend

    from .client import backend_settings

    options = next(iter(backend_settings(backend, run).values()))["OPTIONS"]
    cls: type[LockBackend] = ZooKeeperBackend if backend == "zookeeper" else EtcdBackend
    lock_backend = cls("nemesis", options)
    try:
        holders = lock_backend.holders("beat.default")
    except Exception:  # no leader known: the fault picks a beat by the seed
        return None
    finally:
        lock_backend.close()
    return holders[0].holder.pid if holders else None


def run_beats(backend: str, faults: list[str], *, seed: int, baseline: float = 5.0,
              duration: float = 10.0, recovery: float = 12.0, interval: float = 1.0,
              ttl: float = TTL) -> dict[str, Any]:
    import random

    nemesis.heal_all(backend)
    nemesis.wait_healthy(backend)
    run_id = f"beat-{backend}-{'+'.join(faults)}-s{seed}-{int(time.time())}"
    folder = topology.STATE / "runs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    base = {"backend": backend, "session": 4.0, "beat_ttl": ttl, "queue": f"jepsen-{run_id}",
            "database": f"{store.DATABASE}_beat", "redis_db": 8,
            "alias": "zk" if backend == "zookeeper" else "etcd1"}
    prepare(base, interval)
    collector = Collector(f"redis://127.0.0.1:6379/{base['redis_db']}", base["queue"])
    collector.start()
    collector.ready.wait(15)
    beats: dict[str, subprocess.Popen] = {}
    done: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for name, (host, etcd_node) in HOSTS.items():
            run = {**base, "alias": etcd_node if backend == "etcd" else "zk"}
            log = open(folder / f"{name}.log", "w")  # noqa: SIM115 (lives with the process)
            beats[name] = subprocess.Popen(
                ["ip", "netns", "exec", topology.namespace(host), sys.executable,
                 str(topology.REPO / "manage.py"), "celery", "default", "beat", "-S",
                 "django_celery_adv", "-l", "info", "--pidfile="],
                cwd=topology.REPO, env=_env(run, root=False), stdout=log,
                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while not collector.sent:  # a beat leads and sends: both are up by now
            if time.monotonic() > deadline or any(p.poll() is not None for p in beats.values()):
                raise RuntimeError(f"no beat sent within 90 s; logs in {folder}")
            time.sleep(0.2)
        time.sleep(baseline)
        ctx = nemesis.Context(backend, duration, random.Random(seed),
                              {name: p.pid for name, p in beats.items()})
        for fault in faults:
            if fault == "pause-client":  # pause the leading beat, not a standby
                lead = leader_pid(backend, base)
                ctx.clients = {n: p.pid for n, p in beats.items() if p.pid == lead} or ctx.clients
            done.append({"fault": fault, **nemesis.FAULTS[fault](ctx)})
            time.sleep(recovery)
    finally:
        nemesis.heal_all(backend)
        topology.stop_processes(beats.values())
        time.sleep(0.5)
        collector.stopping.set()
        collector.join(5)
    result = check(collector.sent, done, interval, started, run_id, backend, seed)
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    return result


def check(sent: list[tuple[float, int | None]], faults: list[dict[str, Any]], interval: float,
          started: float, run_id: str, backend: str, seed: int) -> dict[str, Any]:
    times = sorted(at for at, _ in sent)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    duplicates = sum(1 for gap in gaps if gap < interval / 2)
    for fault in faults:
        window = [t for t in times if fault["started"] <= t]
        window = [fault["started"], *window]
        end = fault["healed"] + 2 * interval
        fault["max_gap"] = round(max((b - a for a, b in itertools.pairwise(window)
                                      if a <= end), default=float("nan")), 2)
    return {"backend": backend, "seed": seed, "run_id": run_id, "sends": len(times),
            "duplicates": duplicates, "tokens": sorted({t for _, t in sent if t is not None}),
            "unfenced": sum(1 for _, t in sent if t is None), "faults": faults,
            "seconds": round(time.monotonic() - started, 1)}


def _main() -> None:  # python -m tests.cluster.beat BACKEND FAULT[,FAULT]
    print(json.dumps(run_beats(sys.argv[1], sys.argv[2].split(","), seed=1), indent=1))


if __name__ == "__main__":
    _main()
