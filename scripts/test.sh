#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine (root): installs what is
# missing, starts or reuses the servers on loopback, runs pytest on SQLite and
# on PostgreSQL, and stops the servers it started. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

ensure_venv "all,test"
# Headless browser for tests/test_monitoring_browser.py: Debian's chromium and
# chromium-driver (selenium uses /usr/bin/chromedriver; nothing is downloaded).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "installing chromium + chromium-driver (Debian) ..."
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    chromium chromium-driver >/dev/null
fi
bash scripts/services.sh start
trap 'bash scripts/services.sh stop' EXIT

export TEST_BUILD_DIR="$PWD/build/tests"
mkdir -p "$TEST_BUILD_DIR"
.venv/bin/ruff check django_celery_adv demo_project tests bench

status=0
for db in sqlite postgres; do
  echo "=== pytest on $db ==="
  TEST_DB=$db .venv/bin/pytest -p no:cacheprovider "$@" || status=$?
done
exit $status
