#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine (root): installs what is
# missing, starts or reuses the servers on loopback, runs pytest on SQLite and
# on PostgreSQL, and stops the servers it started. Extra args go to pytest.
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

status=0
for db in sqlite postgres; do
  echo "=== pytest on $db ==="
  TEST_DB=$db .venv/bin/pytest -p no:cacheprovider "$@" || status=$?
done
exit $status
