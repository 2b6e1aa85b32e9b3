#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine (root): installs what is
# missing, starts or reuses the servers on loopback, builds and smoke-tests the
# wheel, runs pytest on SQLite (all of it), then the database tests on
# PostgreSQL and on MariaDB, and stops the servers it started. Extra args go to
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

ensure_venv "all,test"
# Debian tools the tests drive: chromium + chromium-driver for the headless
# browser test (selenium uses /usr/bin/chromedriver; nothing is downloaded) and
# faketime for the moved-clock fault tests.
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v faketime >/dev/null || missing+=(faketime)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (Debian) ..."
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    "${missing[@]}" >/dev/null
fi
# Stop only what this run started: a server another run still uses stays up.
started=$(mktemp)
trap 'xargs -r bash scripts/services.sh stop <"$started"; rm -f "$started"' EXIT
SERVICES_STARTED_FILE=$started bash scripts/services.sh start

export TEST_BUILD_DIR="$PWD/build/tests"
mkdir -p "$TEST_BUILD_DIR"
.venv/bin/ruff check django_celery_adv demo_project tests bench
# The wheel, not the source tree: built, checked, installed into a clean venv
# and driven from outside the repository (templates, migrations, commands).
bash scripts/wheel_smoke.sh

# SQLite runs the whole suite. PostgreSQL and MariaDB run what touches the
# database (marker ``db``, set in tests/conftest.py) less the tests that start
# workers (a worker's use of the database is the code the other tests run
# directly), plus beat's leader election on the database backend on PostgreSQL:
# the rest would only repeat itself. A leg that selects nothing (``-k`` narrowed
# it away) is fine.
status=0
run_leg() {
  local db=$1 what=$2; shift 2
  echo "=== pytest on $db ($what) ==="
  local rc=0
  TEST_DB=$db .venv/bin/pytest -p no:cacheprovider "$@" || rc=$?
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || status=$rc
}
run_leg sqlite "the whole suite" --durations=15 "$@"
run_leg postgres "database tests" -m "db and not workers" "$@"
run_leg postgres "beat leader election on the database lock backend" \
  tests/test_beat.py -k "standby_takes_over and default" "$@"
run_leg mariadb "database tests" -m "db and not workers" "$@"
exit $status
