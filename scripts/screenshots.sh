#!/usr/bin/env bash
# Re-make the README's screenshots of the admin pages (docs/images/*.png), on demand:
# not part of the test suite. Runs tests/screenshots.py, which seeds real workers,
# a held lock, failures and beats, and photographs the pages with the headless
# Chromium of the browser test (tests/browser.py); then optimizes the PNGs
# losslessly (optipng) and fails if one is over 200 kB. Installs what is missing
# (Debian: chromium, chromium-driver, optipng; needs root), starts or reuses the
# servers and stops the ones it started. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

OUT=$PWD/docs/images
MAX_BYTES=200000

ensure_venv "all,test"
apt_ensure_commands chromium:chromium chromedriver:chromium-driver optipng:optipng
started=$(mktemp)
trap 'xargs -r bash scripts/services.sh stop <"$started"; rm -f "$started"' EXIT
SERVICES_STARTED_FILE=$started bash scripts/services.sh start

# A namespace of its own on the shared servers (build directory, Redis database 15,
# vhost, lock prefix): a test run at the same time is not disturbed, nor disturbs it.
name=screenshots
bash scripts/services.sh vhost "$name"
export TEST_BUILD_DIR="${TEST_BUILD_DIR:-$PWD/build/$name}" \
  TEST_REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379/15}" \
  TEST_REDIS_LOCK_URL="${TEST_REDIS_LOCK_URL:-redis://127.0.0.1:6379/15}" \
  TEST_LOCK_NAMESPACE="${TEST_LOCK_NAMESPACE:-$name}" \
  TEST_AMQP_URL="${TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/$name}"
mkdir -p "$TEST_BUILD_DIR" "$OUT"
SCREENSHOTS_DIR=$OUT .venv/bin/pytest -p no:cacheprovider -q -s tests/screenshots.py "$@"

status=0
for png in "$OUT"/*.png; do
  optipng -quiet -o2 -strip all "$png"
  size=$(stat -c %s "$png")
  printf '%8d bytes  %s\n' "$size" "${png#"$PWD"/}"
  if [ "$size" -gt "$MAX_BYTES" ]; then
    echo "screenshots.sh: ${png#"$PWD"/} is over $MAX_BYTES bytes" >&2
    status=1
  fi
done
exit $status
