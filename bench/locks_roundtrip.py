"""Acquire+release round per lock backend vs the server's raw client primitive.

Side by side in one run, interleaved in blocks so that drift hits both alike:
ours (``backend.acquire`` + ``backend.release``, and the whole ``lock()`` API with
its policy lookup and heartbeat registration) against redis-py ``Lock``, kazoo
``Semaphore``, etcd3gw ``Lock`` and a bare INSERT/DELETE.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable

ROUNDS = int(os.environ.get("BENCH_LOCK_ROUNDS", "300"))
BLOCK = 20


def setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(variants: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Median seconds per call of each variant, run interleaved in blocks."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm up connections and scripts
        for _ in range(5):
            fn()
    for _ in range(ROUNDS // BLOCK):
        for name, fn in variants.items():
            samples[name].extend(timed(fn) for _ in range(BLOCK))
    return {name: statistics.median(values) for name, values in samples.items()}


def ours(alias: str, capacity: int) -> Callable[[], None]:
    from django_celery_adv.locks.backends import lock_backends
    from django_celery_adv.locks.backends.base import Holder

    backend = lock_backends[alias]
    name = f"bench-{uuid.uuid4().hex[:8]}"
    holder = Holder(task_id="bench")

    def round_trip() -> None:
        backend.release(backend.acquire(name, capacity, holder, 60))

    return round_trip


def ours_api(alias: str, capacity: int) -> Callable[[], None]:
    from django_celery_adv.locks import lock
    from django_celery_adv.models import LockDefinition

    name = f"bench-api-{uuid.uuid4().hex[:8]}"
    LockDefinition.objects.create(name=name, backend=alias, capacity=capacity, ttl=60, wait=0)

    def round_trip() -> None:
        with lock(name):
            pass

    return round_trip


def raw_redis() -> Callable[[], None]:
    import redis
    from django.conf import settings

    client = redis.Redis.from_url(settings.REDIS_LOCK_URL)
    name = f"bench-raw-{uuid.uuid4().hex[:8]}"

    def round_trip() -> None:
        lock = client.lock(name, timeout=60)
        lock.acquire(blocking=False)
        lock.release()

    return round_trip


def raw_kazoo(capacity: int) -> Callable[[], None]:
    from django.conf import settings
    from kazoo.client import KazooClient

    client = KazooClient(hosts=settings.ZOOKEEPER_HOSTS)
    client.start()
    path = f"/celery-adv-bench/raw-{uuid.uuid4().hex[:8]}"
    # The recipe our backend is built on, for every capacity.
    recipe = client.Semaphore(path, "bench", max_leases=capacity)

    def round_trip() -> None:
        recipe.acquire(blocking=False)
        recipe.release()

    return round_trip


def raw_etcd() -> Callable[[], None]:
    from django.conf import settings
    from etcd3gw.client import Etcd3Client

    client = Etcd3Client(host=settings.ETCD_HOST, port=settings.ETCD_PORT)
    name = f"bench-raw-{uuid.uuid4().hex[:8]}"

    def round_trip() -> None:
        lock = client.lock(name, ttl=60)
        lock.acquire()
        lock.release()

    return round_trip


def raw_database() -> Callable[[], None]:
    from django.db import connection, transaction

    name = f"bench-raw-{uuid.uuid4().hex[:8]}"
    insert = ("INSERT INTO django_celery_adv_locklease (name, slot, token, task_id, hostname, "
              "pid, acquired_at, expires_at) VALUES (%s, 0, 1, 'bench', 'h', 1, %s, %s)")
    delete = "DELETE FROM django_celery_adv_locklease WHERE name = %s AND slot = 0"

    def round_trip() -> None:
        from django.utils import timezone

        now = timezone.now()
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(insert, [name, now, now])
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(delete, [name])

    return round_trip


CASES = [
    # (label, our backend alias, capacity, raw peer label, raw factory)
    ("Redis", "redis", 1, "redis-py Lock", raw_redis),
    ("ZooKeeper, capacity 1", "zookeeper", 1, "kazoo Semaphore", lambda: raw_kazoo(1)),
    ("ZooKeeper, capacity 4", "zookeeper", 4, "kazoo Semaphore", lambda: raw_kazoo(4)),
    ("etcd", "etcd", 1, "etcd3gw Lock", raw_etcd),
    ("Database", "default", 1, "bare INSERT + DELETE", raw_database),
]


def main() -> int:
    setup_django()
    from bench.report import DATABASES, database, write_section

    data = {}
    rows = ["| backend | raw peer | raw (ms) | ours: backend (ms) | ratio | "
            "ours: `lock()` API (ms) | ratio |", "|---|---|---|---|---|---|---|"]
    for label, alias, capacity, peer, raw in CASES:
        medians = compare({"raw": raw(), "ours": ours(alias, capacity),
                           "api": ours_api(alias, capacity)})
        raw_ms, ours_ms, api_ms = (medians[k] * 1000 for k in ("raw", "ours", "api"))
        rows.append(f"| {label} | {peer} | {raw_ms:.2f} | {ours_ms:.2f} | "
                    f"{ours_ms / raw_ms:.2f}x | {api_ms:.2f} | {api_ms / raw_ms:.2f}x |")
        print(rows[-1], flush=True)
        if alias == "default":
            data = {"raw_ms": raw_ms, "ours_ms": ours_ms, "api_ms": api_ms}
    db = database()
    write_section(
        f"locks-roundtrip-{db}", f"Lock acquire + release round ({DATABASES[db]} database)",
        "\n".join(rows) + f"\n\n{ROUNDS} rounds per variant, medians of one run with raw, "
        f"backend and API interleaved in blocks of {BLOCK}. Targets: ZooKeeper <= 1.3x "
        "kazoo's Semaphore (the recipe the backend is built on) at capacity 1 and 4; "
        "Redis and etcd <= 1.5x their raw primitive. *backend* is the backend's "
        "acquire+release; *`lock()` API* adds the admin-row policy lookup (cached) and "
        "registering the lease with the process's renewal heartbeat thread. The database "
        "row's peer is the least a lease row costs (one INSERT and one DELETE, each in its "
        "own transaction); the backend's acquire also upserts the name's fence row (its "
        "row lock serializes the name's acquirers; it returns the token and the server's "
        "clock), deletes expired leases and looks for the lowest free slot. Only the "
        "database row depends on the database; the others are repeated in each "
        "database's section.\n", data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
