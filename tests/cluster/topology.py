"""Where things run in the private network that ``scripts/cluster.sh`` builds.

Mirrors the script's fixed addresses (10.77.0.0/24, only inside the namespaces
``cadv-*`` and on the bridge ``cadv-br0``): a test reads them from here, never
from any other network.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "cluster.sh"
STATE = Path(os.environ.get("CLUSTER_DIR", REPO / "build" / "cluster"))
PREFIX = "cadv-"
NET = "10.77.0"
#: The root namespace's address on the bridge: the PostgreSQL relay listens here.
ROOT = f"{NET}.1"
RELAY_PORT = 15432
BROKER_RELAY_PORT = 16379

ADDR = {"zk1": 11, "zk2": 12, "zk3": 13, "etcd1": 21, "etcd2": 22, "etcd3": 23,
        "redis1": 41, "redis2": 42, "redis3": 43, "c1": 31, "c2": 32}
NODES = {"zookeeper": ["zk1", "zk2", "zk3"], "etcd": ["etcd1", "etcd2", "etcd3"],
         "redis": ["redis1", "redis2", "redis3"]}
CLIENTS = ["c1", "c2"]
ZK_PORT, ETCD_PORT, REDIS_PORT, SENTINEL_PORT = 2181, 2379, 6379, 26379


def ip(node: str) -> str:
    return f"{NET}.{ADDR[node]}"


def namespace(node: str) -> str:
    return PREFIX + node


def in_ns(node: str, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``command`` inside ``node``'s namespace (``ip netns exec``)."""
    return subprocess.run(["ip", "netns", "exec", namespace(node), *command], check=check,
                          capture_output=True, text=True, timeout=30)


def cluster(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``scripts/cluster.sh <args>``: the one place that starts nodes."""
    return subprocess.run(["bash", str(SCRIPT), *args], check=check, capture_output=True,
                          text=True, timeout=300)


def pid_of(node: str) -> int | None:
    """The server process of ``node`` (``zk1``, ``sentinel-redis2`` ...), if running."""
    try:
        return int((STATE / f"{node}.pid").read_text())
    except (OSError, ValueError):
        return None


def stop_processes(processes: Iterable[subprocess.Popen]) -> None:
    """SIGTERM every process, then wait for each (SIGKILL past 20 s)."""
    processes = list(processes)
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
