"""The fenced store: a PostgreSQL table that honours fencing tokens.

One row per (lock, slot) holds the highest token it has accepted. A write is
one conditional ``UPDATE``: it lands only if its token is not lower than that
(equal: the same grant writing again; tokens are unique per grant), so once a
newer holder has written, a superseded one can never write again, whatever it
believes about its lease. That is what a storage must do for lease-based locks
to be safe (Kleppmann's fencing), and what the checker counts as rejections.

Where it runs: the shared PostgreSQL on 127.0.0.1:5432 in the root namespace,
database ``CLUSTER_PG_NAME`` (default ``celery_adv_jepsen``, suffixed with
``TEST_LOCK_NAMESPACE`` when set; created if missing).
Clients inside the namespaces reach it through the socat relay that
``scripts/cluster.sh`` runs on the bridge address (``10.77.0.1:15432``), which a
partition never cuts (partitions only drop traffic to cluster nodes).
"""

from __future__ import annotations

import contextlib
import os
import re

import psycopg

from . import topology

# Runs beside each other (CI legs, helpers) each have a TEST_LOCK_NAMESPACE:
# each gets its own database.
_NAMESPACE = re.sub(r"\W", "_", os.environ.get("TEST_LOCK_NAMESPACE", "")).lower()
DATABASE = os.environ.get("CLUSTER_PG_NAME",
                          "celery_adv_jepsen" + (f"_{_NAMESPACE}" if _NAMESPACE else ""))


def dsn(*, from_namespace: bool) -> str:
    host, port = (topology.ROOT, topology.RELAY_PORT) if from_namespace else ("127.0.0.1", 5432)
    return f"host={host} port={port} user=postgres dbname={DATABASE} connect_timeout=5"


def create_database(name: str) -> None:
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres",
                         autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            # A run beside this one may create it between the check and here.
            with contextlib.suppress(psycopg.errors.DuplicateDatabase,
                                     psycopg.errors.UniqueViolation):
                admin.execute(f'CREATE DATABASE "{name}"')


def prepare(rows: list[tuple[str, int]]) -> None:
    """Create the database and table if missing; give each (lock, slot) a row at token 0."""
    create_database(DATABASE)
    with psycopg.connect(dsn(from_namespace=False), autocommit=True) as conn:
        # Two runs creating the table at once: CREATE TABLE IF NOT EXISTS is not
        # safe against that in PostgreSQL (a unique violation on pg_type), so the
        # creators take turns on an advisory lock held until the commit.
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('celery_adv fenced table'))")
            conn.execute("CREATE TABLE IF NOT EXISTS fenced (lock text, slot int, token "
                         "bigint NOT NULL, writer text, writes bigint NOT NULL DEFAULT 0, "
                         "PRIMARY KEY (lock, slot))")
        for lock, slot in rows:
            conn.execute("INSERT INTO fenced (lock, slot, token) VALUES (%s, %s, 0) "
                         "ON CONFLICT (lock, slot) DO UPDATE SET token = 0, writes = 0",
                         [lock, slot])


def drop(locks: list[str]) -> None:
    with psycopg.connect(dsn(from_namespace=False), autocommit=True) as conn:
        conn.execute("DELETE FROM fenced WHERE lock = ANY(%s)", [locks])


class FencedStore:
    """One client's connection; ``write`` answers whether fencing accepted it."""

    def __init__(self, conninfo: str) -> None:
        self.conn = psycopg.connect(conninfo, autocommit=True)

    def write(self, lock: str, slot: int, token: int, writer: str) -> bool:
        cursor = self.conn.execute(
            "UPDATE fenced SET token = %s, writer = %s, writes = writes + 1 "
            "WHERE lock = %s AND slot = %s AND token <= %s", [token, writer, lock, slot, token])
        return cursor.rowcount == 1

    def close(self) -> None:
        self.conn.close()
