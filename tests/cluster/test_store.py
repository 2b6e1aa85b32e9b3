"""The fenced store's setup is safe to run side by side (no cluster needed, PostgreSQL only).

The short run prepares ZooKeeper's and etcd's locks from two threads at once;
on a database of its own (a fresh CI clone) both created the table at the
same moment, and PostgreSQL's ``CREATE TABLE IF NOT EXISTS`` is not safe
against that: one run failed with a unique violation on ``pg_type``.
"""

from __future__ import annotations

import threading
import uuid

import psycopg

from tests.cluster import store


def test_runs_side_by_side_prepare_a_new_database_without_error(monkeypatch) -> None:
    name = f"celery_adv_store_{uuid.uuid4().hex[:12]}"
    monkeypatch.setattr(store, "DATABASE", name)
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def prepare(run: int) -> None:
        try:
            barrier.wait()
            store.prepare([(f"lock-{run}", slot) for slot in range(3)])
        except BaseException as e:  # reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=prepare, args=(run,)) for run in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        with psycopg.connect(store.dsn(from_namespace=False)) as conn:
            rows = conn.execute("SELECT count(*), max(token) FROM fenced").fetchone()
        assert rows == (18, 0)
    finally:
        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres",
                             autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
