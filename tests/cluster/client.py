"""One workload client process, run inside a client namespace (``ip netns exec``).

    python -m tests.cluster.client CONFIG.json NAME

Each worker thread takes a lock of the run over and over through the project's
lock layer (``api.try_acquire``: the backend, its heartbeat, lost-lease
reports), holds it for a random short time writing to the fenced store with
its token, and gives it back. Everything is timed on ``time.monotonic()``
(CLOCK_MONOTONIC: one clock for every namespace of the machine).

Per grant it records one JSON line: the instants ``is_valid()`` said True
(first and last: the interval the holder *believed* it held the slot; the
clock is read just before each call), each write (sent at, accepted or
fenced), and when the loss was reported (``on_lost``), if it was. A write is
sent only right after ``is_valid()`` said True, as an application must.

Backends: ZooKeeper is one alias whose ``hosts`` lists the three nodes (kazoo
fails over). ``EtcdBackend`` talks to one ``host``/``port`` (etcd3gw has no
failover), so there is one alias per node: a client starts on "its" node and
moves to the next after a ``LockError``; a held lease keeps being renewed and
released through the alias that granted it. Redis: a primary found through the
three Sentinels (a test-side subclass: the project's backend takes one URL).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import django
from django.conf import settings

from . import topology
from .store import FencedStore

STOP = threading.Event()


def backend_settings(backend: str, run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """LOCK_BACKENDS for one backend of the cluster."""
    if backend == "zookeeper":
        hosts = ",".join(f"{topology.ip(n)}:{topology.ZK_PORT}" for n in topology.NODES[backend])
        return {"zk": {"BACKEND": "django_celery_adv.locks.backends.zookeeper.ZooKeeperBackend",
                       "OPTIONS": {"hosts": hosts, "timeout": run["session"],
                                   "connect_timeout": 2, "root": "/celery-adv/jepsen"}}}
    if backend == "etcd":
        return {node: {"BACKEND": "django_celery_adv.locks.backends.etcd.EtcdBackend",
                       "OPTIONS": {"host": topology.ip(node), "port": topology.ETCD_PORT,
                                   "timeout": 2, "prefix": "/celery-adv/jepsen/"}}
                for node in topology.NODES[backend]}
    return {"redis": {"BACKEND": "tests.cluster.sentinel.SentinelRedisBackend",
                      "OPTIONS": {"url": "redis://sentinel/0", "socket_timeout": 1,
                                  "sentinels": run["sentinels"]}}}


class Worker(threading.Thread):
    def __init__(self, client: str, index: int, lock: str, capacity: int,
                 aliases: list[str], run: dict[str, Any], out: Any, out_lock: threading.Lock):
        super().__init__(name=f"{client}-{lock}-{index}", daemon=True)
        self.client, self.lock, self.capacity = client, lock, capacity
        self.aliases, self.run_config = aliases, run
        self.out, self.out_lock = out, out_lock
        self.random = random.Random(f"{run['seed']}-{self.name}")
        self.store = FencedStore(run["store"])

    def emit(self, record: dict[str, Any]) -> None:
        with self.out_lock:
            self.out.write(json.dumps(record) + "\n")
            self.out.flush()

    def run(self) -> None:
        from django_celery_adv.exceptions import LockError
        from django_celery_adv.locks import api
        from django_celery_adv.locks.backends.base import Holder
        from django_celery_adv.locks.definitions import LockPolicy

        at = 0
        while not STOP.is_set():
            alias = self.aliases[at % len(self.aliases)]
            policy = LockPolicy(name=self.lock, backend=alias, capacity=self.capacity,
                                ttl=self.run_config["ttl"], retry_countdown=1, retry_jitter=0,
                                retry_backoff=False, wait=0, max_retries=None, on_busy="retry")
            lost: list[float] = []
            asked = time.monotonic()
            try:
                lease = api.try_acquire(policy, Holder(task_id=self.name),
                                        on_lost=lambda _, into=lost: into.append(time.monotonic()))
            except LockError as e:
                self.emit({"kind": "error", "lock": self.lock, "client": self.client,
                           "alias": alias, "at": asked, "error": str(e)[:200]})
                at += 1  # next node (etcd); ZooKeeper has one alias
                time.sleep(self.random.uniform(0.05, 0.2))
                continue
            if lease is None:
                time.sleep(self.random.uniform(0.01, 0.04))
                continue
            self.hold(api, lease, lost, alias, asked)

    def hold(self, api: Any, lease: Any, lost: list[float], alias: str, asked: float) -> None:
        granted = time.monotonic()
        record: dict[str, Any] = {
            "kind": "grant", "lock": self.lock, "capacity": self.capacity, "slot": lease.slot,
            "token": lease.token, "client": self.client, "worker": self.name, "pid": os.getpid(),
            "alias": alias, "asked": asked, "granted": granted, "first_valid": None,
            "last_valid": None, "writes": [], "lost_at": None, "expired": False}
        short_lo, short_hi, long_lo, long_hi, p_long = self.run_config["hold"]
        # Mostly short holds; some long ones that the heartbeat renews and a fault can catch.
        until = granted + (self.random.uniform(long_lo, long_hi) if self.random.random() < p_long
                           else self.random.uniform(short_lo, short_hi))
        try:
            while True:
                checked = time.monotonic()
                if not lease.is_valid():
                    record["expired"] = True  # validity ended before the hold did
                    break
                record["first_valid"] = record["first_valid"] or checked
                record["last_valid"] = checked
                sent = time.monotonic()
                try:
                    accepted = self.store.write(self.lock, lease.slot, lease.token, self.name)
                except Exception as e:  # the store is not under test: note it, go on
                    record["writes"].append([sent, None, str(e)[:100]])
                else:
                    record["writes"].append([sent, accepted])
                if time.monotonic() >= until or STOP.is_set():
                    checked = time.monotonic()
                    if lease.is_valid():
                        record["last_valid"] = checked
                    break
                time.sleep(self.random.uniform(0.02, 0.08))
        finally:
            record["released"] = time.monotonic()
            api.release(lease)
            record["lost_at"] = lost[0] if lost else None
            self.emit(record)


def main() -> None:
    config_path, client = sys.argv[1], sys.argv[2]
    run = json.loads(Path(config_path).read_text())
    backend = run["backend"]
    # Each host starts on "its" node: etcd1 / etcd2, and for Redis the Sentinel
    # of redis1 / redis2 first (so that a split primary has a client on each side).
    start = topology.CLIENTS.index(run["client_host"][client])
    run["sentinels"] = run["sentinels"][start:] + run["sentinels"][:start]
    lock_backends = backend_settings(backend, run)
    aliases = list(lock_backends)
    aliases = aliases[start:] + aliases[:start]
    settings.configure(
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth",
                        "django_celery_adv"],
        DATABASES={}, USE_TZ=True,
        CELERY_ADV={"APPS": {}, "LOCK_BACKENDS": lock_backends},
        LOGGING_CONFIG=None)
    django.setup()
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    out_lock = threading.Lock()
    with open(Path(run["dir"]) / f"{client}.jsonl", "a") as out:
        workers = [Worker(client, i, lock, capacity, aliases, run, out, out_lock)
                   for lock, capacity, threads in run["locks"] for i in range(threads)]
        out.write(json.dumps({"kind": "start", "client": client, "pid": os.getpid(),
                              "at": time.monotonic()}) + "\n")
        out.flush()
        for worker in workers:
            worker.start()
        while not STOP.wait(0.2):
            pass
        for worker in workers:
            worker.join(15)
    os._exit(0)  # do not wait for kazoo's threads


if __name__ == "__main__":
    main()
