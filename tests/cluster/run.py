"""One run: workload clients on both client hosts, faults one after another, the check.

    run(backend, ["partition-client", ...], seed=1) -> the checker's result

Timeline: heal everything and wait for a healthy cluster; start two client
processes in each client namespace (``c1a``, ``c1b`` in ``cadv-c1``; ``c2a``,
``c2b`` in ``cadv-c2``), each with one worker on the capacity-1 lock and two
on the capacity-3 semaphore; ``baseline`` seconds of plain load; then each
fault for ``duration`` seconds followed by ``recovery`` seconds of load; stop
the clients (SIGTERM: each finishes its current hold) and check. Holds are
short (``hold[0]``..``hold[1]`` s) but with probability ``hold[4]`` long
(``hold[2]``..``hold[3]`` s), renewed by the heartbeat, so faults catch holders.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import checker, nemesis, store, topology

#: Session timeout (ZooKeeper) and lease TTL (all): a fault lasts longer than both.
SESSION, TTL = 4.0, 3.0
PROCESSES = {"c1": ["c1a", "c1b"], "c2": ["c2a", "c2b"]}


def run(backend: str, faults: list[str], *, seed: int, baseline: float = 6.0,
        duration: float = 10.0, recovery: float = 12.0, folder: Path | None = None,
        hold: tuple[float, ...] = (0.05, 0.3, 1.0, 6.0, 0.15)) -> dict[str, Any]:
    rng = random.Random(seed)
    nemesis.heal_all(backend)
    nemesis.wait_healthy(backend)
    run_id = f"{backend}-{'+'.join(faults)}-s{seed}-{int(time.time())}"
    folder = folder or topology.STATE / "runs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    locks = [[f"jepsen-{run_id}-lock", 1, 1], [f"jepsen-{run_id}-sem", 3, 2]]
    store.prepare([(name, slot) for name, capacity, _ in locks for slot in range(capacity)])
    config = {
        "backend": backend, "seed": seed, "dir": str(folder), "locks": locks, "ttl": TTL,
        "session": SESSION, "hold": list(hold), "store": store.dsn(from_namespace=True),
        "client_host": {p: host for host, names in PROCESSES.items() for p in names},
        "sentinels": [[topology.ip(n), topology.SENTINEL_PORT] for n in topology.NODES["redis"]],
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    clients: dict[str, subprocess.Popen] = {}
    done: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for host, names in PROCESSES.items():
            for name in names:
                log = open(folder / f"{name}.log", "w")  # noqa: SIM115 (lives with the process)
                clients[name] = subprocess.Popen(
                    ["ip", "netns", "exec", topology.namespace(host), sys.executable, "-m",
                     "tests.cluster.client", str(folder / "config.json"), name],
                    cwd=topology.REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _wait_started(folder, clients)
        time.sleep(baseline)
        ctx = nemesis.Context(backend, duration, rng,
                              {name: p.pid for name, p in clients.items()})
        for fault in faults:
            record = nemesis.FAULTS[fault](ctx)
            done.append({"fault": fault, **record})
            time.sleep(recovery)
    finally:
        nemesis.heal_all(backend)
        topology.stop_processes(clients.values())
    ended = time.monotonic()
    result = checker.check(checker.load(folder), done, started, ended)
    result.update(backend=backend, seed=seed, run_id=run_id, seconds=round(ended - started, 1),
                  exit_codes={n: p.returncode for n, p in clients.items()})
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    store.drop([name for name, _, _ in locks])
    return result


def _wait_started(folder: Path, clients: dict[str, subprocess.Popen],
                  timeout: float = 90.0) -> None:
    """Until every client wrote its start line (Django's import takes seconds on a busy machine)."""
    deadline = time.monotonic() + timeout
    for name, process in clients.items():
        path = folder / f"{name}.jsonl"
        while not (path.exists() and path.read_text().strip()):
            if process.poll() is not None:
                log = (folder / f"{name}.log").read_text()[-2000:]
                raise RuntimeError(f"client {name} exited with {process.returncode}:\n{log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"client {name} did not start within {timeout} s")
            time.sleep(0.1)
