#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine (root): installs what is
# missing, starts or reuses the servers on loopback, builds and smoke-tests the
# wheel, runs pytest on SQLite (all of it) and, beside it, the database tests on
# PostgreSQL and on MariaDB and the Django 6.0 leg, and stops the servers it
# started. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

ensure_venv "all,test"
# Debian tools the tests drive: chromium + chromium-driver for the headless
# browser test (selenium uses /usr/bin/chromedriver; nothing is downloaded) and
# faketime for the moved-clock fault tests.
apt_ensure_commands chromium:chromium chromedriver:chromium-driver faketime:faketime
# Stop only what this run started: a server another run still uses stays up.
started=$(mktemp) side_pid=
trap '[ -z "$side_pid" ] || kill -- "-$side_pid" 2>/dev/null || true
  xargs -r bash scripts/services.sh stop <"$started"; rm -f "$started"' EXIT
SERVICES_STARTED_FILE=$started bash scripts/services.sh start

export TEST_BUILD_DIR="$PWD/build/tests"
mkdir -p "$TEST_BUILD_DIR"
.venv/bin/ruff check django_celery_adv demo_project tests bench
# The wheel, not the source tree: built, checked, installed into a clean venv
# and driven from outside the repository (templates, migrations, commands).
bash scripts/wheel_smoke.sh

# Legs. SQLite runs the whole suite on Django 5.2 / Python 3.11. Beside it, one
# after the other: what touches the database (marker ``db``, set in
# tests/conftest.py) less the tests that start workers, on PostgreSQL and on
# MariaDB (a worker's use of the database is the code those tests run directly),
# beat's leader election on the database backend on PostgreSQL, and the
# Django 6.0 leg (scripts/django6.sh: newest Python >= 3.12, SQLite) over
# everything but worker processes and the cluster. The legs beside it run in
# their own namespace on the shared servers (Redis databases, RabbitMQ vhost,
# lock-key prefix, build directory), so the two never see each other's queues,
# workers or locks. A leg that selects nothing (-k narrowed it away) is fine.
leg() {   # leg DB WHAT [--django6] PYTEST-ARGS...
  local db=$1 what=$2 rc=0 pytest=(.venv/bin/pytest); shift 2
  if [ "${1:-}" = --django6 ]; then pytest=(bash scripts/django6.sh); shift; fi
  echo "=== pytest on $db ($what) ==="
  TEST_DB=$db "${pytest[@]}" -p no:cacheprovider "$@" || rc=$?
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || return "$rc"
}
side_name=celery-adv-ci-side
bash scripts/services.sh vhost "$side_name"
side_log=$PWD/build/tests-side.log
set -m   # the legs beside it get their own process group: the EXIT trap stops them all
(
  export TEST_BUILD_DIR=$PWD/build/tests-side TEST_LOCK_NAMESPACE=$side_name \
    TEST_REDIS_URL=redis://127.0.0.1:6379/13 TEST_REDIS_LOCK_URL=redis://127.0.0.1:6379/14 \
    TEST_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/$side_name
  mkdir -p "$TEST_BUILD_DIR"
  rc=0
  leg postgres "database tests" -m "db and not workers" "$@" || rc=$?
  leg postgres "beat leader election on the database lock backend" \
    tests/test_beat.py -k "standby_takes_over and default" "$@" || rc=$?
  leg mariadb "database tests" -m "db and not workers" "$@" || rc=$?
  leg sqlite "Django 6.0, all but worker processes and the cluster" --django6 \
    -m "not workers and not cluster" "$@" || rc=$?
  exit $rc
) >"$side_log" 2>&1 &
side_pid=$!
set +m
status=0
leg sqlite "the whole suite" --durations=15 "$@" || status=$?
echo "=== the legs beside it (PostgreSQL, MariaDB, Django 6.0): waiting; log $side_log ==="
wait "$side_pid" || status=$?
side_pid=
cat "$side_log"
exit $status
