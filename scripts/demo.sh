#!/usr/bin/env bash
# The demo from nothing: .venv, migrations, an admin user, a worker per app,
# beat and the web server, supervised (demo_project/launch.py). No server needed
# (SQLite + filesystem broker); DEMO_DEFAULT_BROKER / DEMO_GLOBAL_BROKER switch an
# app to a real broker URL; DEMO_PORT, DEMO_HOST, DEMO_VAR_DIR, DEMO_ADMIN_USER,
# DEMO_ADMIN_PASSWORD: see README. exec: Ctrl-C and SIGHUP reach the launcher itself.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv "all"
exec .venv/bin/python -m demo_project.launch
