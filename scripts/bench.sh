#!/usr/bin/env bash
# Benchmarks (not tests): writes docs/benchmarks.md. Starts the servers like test.sh.
#   bash scripts/bench.sh                   # SQLite database
#   TEST_DB=postgres bash scripts/bench.sh  # PostgreSQL (database celery_adv_bench)
#   TEST_DB=mariadb bash scripts/bench.sh   # MariaDB (database celery_adv_bench)
# Sections that depend on the database are keyed by it; the last step collects the
# database lock round and makespan of every database run so far into one table.
# Env: BENCH_LOCK_ROUNDS (300), BENCH_MASK_ROUNDS (5), BENCH_INSPECT_ROUNDS (30),
#      BENCH_INSPECT_SLOW_ROUNDS (5), BENCH_PAGE_ROUNDS (20), BENCH_FAILOVERS (5),
#      BENCH_STREAM_TASKS (3000), BENCH_REPLAY_EVENTS (60000), BENCH_TASK_ROWS (1000000),
#      BENCH_METRICS_ROUNDS (30), BENCH_METRICS_RECORDS (100000), BENCH_METRICS_RECENT (3000),
#      BENCH_FLEET_SIZES (10,100,300,1000,2000), BENCH_FLEET_ROUNDS (3),
#      BENCH_SKIP="masking beat_failover ..." (bench modules not to run this time).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv "all,test,bench"
# Stop only what this run started: a server another run still uses stays up.
started=$(mktemp)
trap 'xargs -r bash scripts/services.sh stop <"$started"; rm -f "$started"' EXIT
SERVICES_STARTED_FILE=$started bash scripts/services.sh start
bash scripts/services.sh vhost bench   # bench/settings.py's RabbitMQ vhost
# bench/settings.py names a database of its own: create it on a fresh machine.
DJANGO_SETTINGS_MODULE=bench.settings .venv/bin/python - <<'PY'
from django.conf import settings

from bench.databases import create_database

db = settings.DATABASES["default"]
if create_database(db):
    print(f"created the database {db['NAME']}")
PY
echo "bench.sh: TEST_DB=${TEST_DB:-sqlite}, $(uptime)"
for module in locks_roundtrip makespan inspect_all masking beat_failover fleet_bench recorder_bench \
    metrics_bench; do
  if [[ " ${BENCH_SKIP:-} " == *" $module "* ]]; then
    echo "bench.sh: skipped bench.$module (BENCH_SKIP)"
    continue
  fi
  started_at=$SECONDS
  .venv/bin/python -m "bench.$module"
  echo "bench.sh: bench.$module took $((SECONDS - started_at)) s"
done
.venv/bin/python -m bench.report
echo "bench.sh: done, $(uptime)"
