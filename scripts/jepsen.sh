#!/usr/bin/env bash
# The Jepsen-style fault matrix of the lock backends on real clusters (tests/cluster/):
# every nemesis x ZooKeeper and etcd, the failover faults on Redis with Sentinel.
# Starts the cluster (scripts/cluster.sh), runs one bounded run per backend x fault
# (about 35 s each) and one beat run per backend with three faults (~80 s each):
# ~13 min in all. Writes docs/cluster-faults.md, and stops the cluster again unless
# it was already up. Exits 1 if ZooKeeper or etcd showed an overlap, a duplicate
# token or a write after a reported loss, or a beat sent a tick twice.
#   bash scripts/jepsen.sh [--seed N] [--backends zookeeper,etcd,redis] [--faults a,b]
# Needs root (network namespaces); PostgreSQL on 127.0.0.1:5432 (the fenced store).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
was_up=0
bash scripts/cluster.sh status >/dev/null 2>&1 && was_up=1
bash scripts/cluster.sh start
rc=0
PYTHONPATH=$PWD "$PY" -m tests.cluster.jepsen "$@" || rc=$?
if [ "$was_up" = 0 ] && [ -z "${KEEP_CLUSTER:-}" ]; then
  # The run folders go with the cluster's state: keep a copy of the results.
  mkdir -p build/jepsen && cp -r build/cluster/runs build/jepsen/ 2>/dev/null || true
  bash scripts/cluster.sh stop
fi
exit $rc
