#!/usr/bin/env bash
# The demo from nothing: .venv, migrations, an admin user, a worker per app,
# beat and the web server. No server needed (SQLite + filesystem broker);
# DEMO_DEFAULT_BROKER / DEMO_GLOBAL_BROKER switch an app to a real broker URL.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv "all"
exec .venv/bin/python -m demo_project.launch
