#!/usr/bin/env bash
# Benchmarks (not tests): writes docs/benchmarks.md. Starts the servers like test.sh.
#   bash scripts/bench.sh            # SQLite database
#   TEST_DB=postgres bash scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv "all,test"
bash scripts/services.sh start
trap 'bash scripts/services.sh stop' EXIT
.venv/bin/python -m bench.locks_roundtrip
.venv/bin/python -m bench.makespan
.venv/bin/python -m bench.inspect_all
