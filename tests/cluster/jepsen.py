"""The fault matrix: every nemesis on ZooKeeper and etcd, the split-brain faults on Redis.

    python -m tests.cluster.jepsen [--out docs/cluster-faults.md] [--seed N]
        [--backends zookeeper,etcd,redis] [--faults a,b] [--duration S]

(``scripts/jepsen.sh`` starts the cluster, runs this and stops the cluster.)
One run per backend x fault, then one beat run per backend with three faults
(:mod:`.beat`); writes the tables to ``--out`` and exits 1 if ZooKeeper or
etcd showed an overlap, a duplicate token or a write after a reported loss,
or a beat sent a tick twice. The Redis rows are expected to show double grants: they are
the number behind the README's warning, not a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import beat, nemesis, run, topology

#: Redis: the faults that make Sentinel fail over (the others behave as one server).
REDIS_FAULTS = ["split-1-2", "isolate-leader", "kill9-restart"]
SAFE = ("zookeeper", "etcd")
#: Beat: the leading beat paused past its TTL, a split, its lock server's leader killed.
BEAT_FAULTS = ["pause-client", "split-1-2", "kill9-restart"]
COLUMNS = ("backend", "fault", "what was done", "grants", "grants/s", "overlaps",
           "duplicate tokens", "phantom leases", "fenced writes", "leases lost",
           "lost-then-wrote", "recovery (s)")


def matrix(backends: list[str], faults: list[str] | None) -> list[tuple[str, str]]:
    pairs = []
    for backend in backends:
        chosen = faults or (REDIS_FAULTS if backend == "redis" else list(nemesis.FAULTS))
        pairs += [(backend, fault) for fault in chosen]
    return pairs


def row(result: dict[str, Any]) -> list[str]:
    fault = result["faults"][0] if result["faults"] else {"fault": "-", "detail": "-"}
    recovery = fault.get("recovery")
    counts = [str(result[key]) for key in ("grants", "grants_per_s", "overlaps",
                                           "duplicate_tokens", "phantoms", "fenced", "lost",
                                           "lost_then_wrote")]
    return [result["backend"], fault["fault"], _cell(fault["detail"]), *counts,
            "never" if recovery is None else str(recovery)]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe would end the table cell


def failures(result: dict[str, Any]) -> list[str]:
    """What a ZooKeeper or etcd run must never show."""
    if result["backend"] not in SAFE:
        return []
    bad = [f"{key}={result[key]}" for key in ("overlaps", "duplicate_tokens", "lost_then_wrote")
           if result[key]]
    if not result["grants"]:
        bad.append("no grants")
    if any(code != 0 for code in result["exit_codes"].values()):
        bad.append(f"client exit codes {result['exit_codes']}")
    return bad


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))) // 1024 ** 2
    load = os.getloadavg()[0]
    return (f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {memory} GiB, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}; "
            f"load average {load:.1f} at the start (the machine was shared)")


def versions() -> str:
    def package(name: str) -> str:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True,
                             text=True, check=False).stdout
        return f"{name} {out or '?'}"
    return ", ".join(package(p) for p in ("zookeeper", "etcd-server", "redis-server"))


def write(out: Path, results: list[dict[str, Any]], args: argparse.Namespace,
          started: str, header: str, seconds: float) -> None:
    lines = [header.format(date=started, machine=machine(), versions=versions(),
                           seed=args.seed, duration=args.duration, recovery=args.recovery,
                           session=run.SESSION, ttl=run.TTL, minutes=round(seconds / 60, 1)),
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    beats = [r for r in results if "sends" in r]
    results = [r for r in results if "grants" in r]
    lines += ["| " + " | ".join(row(result)) + " |" for result in results]
    redis = [r for r in results if r["backend"] == "redis"]
    safe = [r for r in results if r["backend"] in SAFE]
    lines += ["", TOTALS.format(
        safe_overlaps=sum(r["overlaps"] for r in safe),
        safe_lost=sum(r["lost_then_wrote"] for r in safe),
        safe_dupes=sum(r["duplicate_tokens"] for r in safe),
        redis_overlaps=sum(r["overlaps"] for r in redis),
        redis_dupes=sum(r["duplicate_tokens"] for r in redis),
        redis_fenced=sum(r["fenced"] for r in redis))]
    phantoms = [r for r in results if r["phantoms"] and r["backend"] == "zookeeper"]
    if phantoms:
        lines.append(PHANTOMS.format(
            count=sum(r["phantoms"] for r in phantoms),
            valid=sum(r["phantoms_valid"] for r in phantoms),
            faults=", ".join(sorted({f"{r['backend']} {r['faults'][0]['fault']}"
                                     for r in phantoms}))))
    if beats:
        lines += ["", BEAT_HEAD.format(ttl=beat.TTL), "",
                  "| backend | fault | what was done | longest gap between sends (s) |",
                  "|---|---|---|---|"]
        for result in beats:
            lines += [f"| {result['backend']} | {f['fault']} | {_cell(f['detail'])} | "
                      f"{f['max_gap']} |"
                      for f in result["faults"]]
        lines += ["", "| backend | sends | duplicate sends | leaderships (tokens) | "
                  "sends without a token |", "|---|---|---|---|---|"]
        lines += [f"| {r['backend']} | {r['sends']} | {r['duplicates']} | {len(r['tokens'])} | "
                  f"{r['unfenced']} |" for r in beats]
    else:
        lines.append(BEAT_LEFT)
    lines += ["", "Runs (records in "
        "`build/cluster/runs/<id>`, copied to `build/jepsen/runs/` when the script stops the "
        "cluster): "
        + ", ".join(f"`{r['run_id']}`" for r in results + beats), ""]
    out.write_text("\n".join(lines))


HEADER = """\
# Locks under cluster faults (Jepsen-style)

Written by `bash scripts/jepsen.sh` on {date} ({minutes} min), seed {seed}.
Machine: {machine}. Servers (Debian): {versions}.

**Setup** (`scripts/cluster.sh`): a 3-node ZooKeeper ensemble, a 3-node etcd
cluster and a Redis primary + replica watched by three Sentinels, each node in
its own network namespace on a private bridge (10.77.0.0/24, never leaving the
machine), and two client hosts `c1`, `c2` (namespaces). In each client host two
processes (`c1a`, `c1b`, `c2a`, `c2b`) run one worker on a capacity-1 lock and
two on a capacity-3 semaphore, through the project's lock layer (backend,
heartbeat, lost-lease reports): take the lock, hold it (mostly 0.05-0.3 s,
15% of holds 1-6 s, renewed by the heartbeat), write to the fenced store with
the token after each `is_valid()` that said True, release, again. ZooKeeper:
one backend with the three hosts, session timeout {session} s. etcd: one
backend per node (`EtcdBackend` takes one host; etcd3gw has no failover), each
client host starts on its own node and moves to the next after a `LockError`.
Redis: the project's scripts and keys on the primary that the Sentinels name
(test-side subclass; `RedisBackend` takes one URL). Lease TTL {ttl} s.

**Each run**: {duration} s of one fault after a few seconds of load, then
{recovery} s of recovery; clients stopped and checked. Faults
(`tests/cluster/nemesis.py`, each healed in a `finally`): `partition-client`
cuts c1 off from every node; `isolate-leader` cuts the leader (Redis: the
primary) off from the other nodes, clients still reach it; `split-1-2` puts the
leader and c1 on one side, the other two nodes and c2 on the other;
`kill9-restart` kills the leader with SIGKILL and starts it again on its data;
`pause-node` SIGSTOPs the leader, `pause-client` one workload process, for
longer than the session timeout and the TTL; `latency` adds `tc netem` 40 ms
+- 20 ms on every node's and client's interface, or, on a kernel without netem
(this VM: `CONFIG_NET_SCH_NETEM` unset), a `tbf` rate limit of 64 kbit/s whose
queue delays every packet. Partitions are blackhole routes on both sides, inside
the namespaces. Sentinel: `down-after-milliseconds` 2000, quorum 2.

**Columns** (`tests/cluster/checker.py`, all times on the machine's one
monotonic clock): *overlaps*: grants whose validity interval (first to last
`is_valid()` that said True) began while capacity others were open, or while
another holder had the same slot; *duplicate tokens*: grants that received a
token already granted for that lock; *phantom leases*: `acquire` returned a
lease with token 0 and slot -1, for no grant (see below); *fenced writes*: writes the store refused
because a newer token had already written (fencing at work, allowed); *leases
lost*: holds whose validity ended, or whose loss was reported, before the
holder meant to release; *lost-then-wrote*: writes sent after the loss was
reported (`on_lost`); *recovery*: from the heal until every client process was
granted again. Fenced store: a PostgreSQL row per (lock, slot) updated by one
`UPDATE ... WHERE token <= %s` (`tests/cluster/store.py`).
"""

TOTALS = """\
**ZooKeeper and etcd**: {safe_overlaps} overlaps, {safe_dupes} duplicate tokens,
{safe_lost} writes after a reported loss, over every fault. **Redis with
Sentinel**: {redis_overlaps} overlapping holders and {redis_dupes} tokens granted
twice over its runs ({redis_fenced} writes refused by the fenced store). In a split
with the primary in the minority, the old primary keeps granting to the clients on
its side while the Sentinels promote the replica for the others; when the old
primary rejoins as a replica its grants and counter increments are gone, so
tokens are handed out again. A crash of the primary (kill9-restart) loses only
what the replica had not yet received, so it can, but need not, grant twice;
isolating the primary alone (isolate-leader) left every client on the old
primary, whose connections were not cut, until the Sentinels demoted it. That is
the README's warning in numbers: where fencing matters, use ZooKeeper, etcd or
the database backend."""

PHANTOMS = """
**Defect found: phantom leases on ZooKeeper** ({count} in these runs, under
{faults}). `ZooKeeperBackend.acquire` returned a `Lease` with token 0 and slot -1
while no lease node had been created: when kazoo's inner `Lock.acquire` (the
Semaphore's guard) gives up after a connection loss it returns False
(`RetryFailedError` is swallowed in `kazoo/recipe/lock.py`), `Semaphore.acquire`
returns False, and `_grant` ignores that return value. {valid} of them read
`is_valid()` True (the client is usually still disconnected when `_confirm` runs,
which makes the lease invalid at once; a valid one is counted in the overlaps if
it overlapped a real holder). A caller that does not check `is_valid()` after
`acquire` runs unlocked, and a client that reconnects before `_confirm` gets a
lease that reads valid and holds nothing (shown without a cluster by patching
`kazoo.recipe.lock.Lock.acquire` to return False: `acquire()` gives `(slot -1,
token 0, is_valid() True)` and `holders()` is empty). Left to the lock-core owner.
"""

BEAT_HEAD = """\
**Beat** (`tests/cluster/beat.py`): two `celery beat -S django_celery_adv` processes,
one on each client host, one periodic task every second, leadership lease TTL
{ttl} s through the cluster (ZooKeeper: the ensemble; etcd: each beat its host's
node); a collector counts what reaches the broker. A duplicate send is one that
arrives less than half an interval after the previous one. The three faults run
one after another in one run per backend; `pause-client` pauses the leading beat."""

BEAT_LEFT = """
**Beat rows**: not run (`--beat 0`, or `LockedScheduler` not in the repository)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=topology.REPO / "docs" / "cluster-faults.md")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 10000)
    parser.add_argument("--backends", default="zookeeper,etcd,redis")
    parser.add_argument("--faults", default="")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--recovery", type=float, default=8.0)
    parser.add_argument("--baseline", type=float, default=4.0)
    parser.add_argument("--beat", type=int, default=1, help="0: no beat rows")
    args = parser.parse_args()
    started_at, started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), time.monotonic()
    results, bad = [], []
    for backend, fault in matrix(args.backends.split(","), [f for f in args.faults.split(",")
                                                          if f] or None):
        result = run.run(backend, [fault], seed=args.seed, baseline=args.baseline,
                         duration=args.duration, recovery=args.recovery)
        results.append(result)
        print(" | ".join(row(result)), flush=True)
        bad += [f"{backend} {fault}: {problem} (seed {args.seed}, run {result['run_id']})"
                for problem in failures(result)]
        if result["overlap_examples"] and backend in SAFE:
            print(json.dumps(result["overlap_examples"][:2], indent=1), file=sys.stderr)
    if args.beat and beat.available():
        for backend in [b for b in args.backends.split(",") if b in SAFE]:
            result = beat.run_beats(backend, BEAT_FAULTS, seed=args.seed, baseline=3,
                                    duration=args.duration, recovery=args.recovery)
            results.append(result)
            print(json.dumps(result), flush=True)
            if result["duplicates"] or result["unfenced"]:
                bad.append(f"beat {backend}: {result['duplicates']} duplicate sends, "
                           f"{result['unfenced']} without a token (run {result['run_id']})")
    write(args.out, results, args, started_at, HEADER, time.monotonic() - started)
    print(f"wrote {args.out}")
    for line in bad:
        print("FAILED:", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
