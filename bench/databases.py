"""Create a benchmark's PostgreSQL or MariaDB database when it is missing.

The benchmarks name databases of their own (``bench/settings.py``, and the
metrics benchmark's second one); on a fresh machine nothing has made them yet.
SQLite needs nothing: the file is made on first use.
"""

from __future__ import annotations

from typing import Any


def create_database(db: dict[str, Any]) -> bool:
    """Create ``db["NAME"]`` on the server of a Django ``DATABASES`` entry unless it
    exists; True when it was created. Other engines: nothing to do."""
    if db["ENGINE"].endswith("postgresql"):
        import psycopg
        from psycopg import sql

        with psycopg.connect(host=db["HOST"], port=db["PORT"], user=db["USER"],
                             password=db["PASSWORD"] or None, dbname="postgres",
                             autocommit=True) as connection:
            if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                  (db["NAME"],)).fetchone():
                return False
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db["NAME"])))
            return True
    if db["ENGINE"].endswith("mysql"):
        import pymysql

        connection = pymysql.connect(host=db["HOST"], port=int(db["PORT"]), user=db["USER"],
                                     password=db["PASSWORD"], autocommit=True)
        try:
            with connection.cursor() as cursor:
                name = db["NAME"].replace("`", "``")
                return bool(cursor.execute(
                    f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4 "
                    "COLLATE utf8mb4_unicode_ci"))
        finally:
            connection.close()
    return False
