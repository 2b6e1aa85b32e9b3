#!/usr/bin/env bash
# Benchmarks (not tests): writes docs/benchmarks.md. Starts the servers like test.sh.
#   bash scripts/bench.sh            # SQLite database
#   TEST_DB=postgres bash scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv "all,test"
# Stop only what this run started: a server another run still uses stays up.
started=$(mktemp)
trap 'xargs -r bash scripts/services.sh stop <"$started"; rm -f "$started"' EXIT
SERVICES_STARTED_FILE=$started bash scripts/services.sh start
if [ "${TEST_DB:-sqlite}" = postgres ]; then
  # bench/settings.py names a database of its own: create it on a fresh machine.
  DJANGO_SETTINGS_MODULE=bench.settings .venv/bin/python - <<'PY'
import psycopg
from django.conf import settings
from psycopg import sql

db = settings.DATABASES["default"]
with psycopg.connect(host=db["HOST"], port=db["PORT"], user=db["USER"],
                     password=db["PASSWORD"] or None, dbname="postgres",
                     autocommit=True) as connection:
    if not connection.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                              (db["NAME"],)).fetchone():
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db["NAME"])))
        print(f"created the PostgreSQL database {db['NAME']}")
PY
fi
.venv/bin/python -m bench.locks_roundtrip
.venv/bin/python -m bench.makespan
.venv/bin/python -m bench.inspect_all
