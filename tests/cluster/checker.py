"""What a run's records prove: overlaps, fencing, writes after loss, rate, recovery.

Input: the clients' JSON lines (see :mod:`.client`) and the nemesis' fault
records. All instants are ``time.monotonic()`` of one machine.

* **overlaps**: a holder's interval is from the first to the last instant its
  ``is_valid()`` said True. Sweeping every interval of a lock in time order,
  each one that begins while ``capacity`` others are open (or while another
  holds the same slot) is an overlap. Must be 0 where the backend promises it.
* **duplicate_tokens**: grants that received a token already granted for that
  lock (the same token twice: a storage cannot tell the two holders apart).
* **phantoms**: ``acquire`` returned a lease with no token and no slot (token
  <= 0, slot < 0): no grant happened. Harmless to a holder that checks
  ``is_valid()`` first (such a lease counts in the overlaps if it ever read
  valid), a hole for one that does not.
* **fenced**: writes the store rejected because a newer token had written.
  Allowed: that is fencing doing its job.
* **lost**: holds whose validity ended (or whose loss was reported) before the
  holder meant to release: the faults that caught a holder.
* **lost_then_wrote**: writes sent after ``on_lost`` reported the lease lost.
  Must be 0.
* **recovery** of a fault: from its heal until every client process was
  granted again (max over processes), or None if one never was.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def load(folder: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records


def overlaps(grants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The grants whose validity began over capacity (or on a held slot)."""
    found = []
    by_lock: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for grant in grants:
        if grant["first_valid"] is not None:
            by_lock[grant["lock"]].append(grant)
    for holds in by_lock.values():
        # (instant, 0 = begins / 1 = ends): a hold checked valid once begins and
        # ends at the same instant, and must end after it began.
        events = sorted([(g["first_valid"], 0, i) for i, g in enumerate(holds)]
                        + [(g["last_valid"], 1, i) for i, g in enumerate(holds)])
        open_: set[int] = set()
        for _, ends, i in events:
            if ends:
                open_.discard(i)
                continue
            grant = holds[i]
            same_slot = [holds[j] for j in open_ if holds[j]["slot"] == grant["slot"]]
            if len(open_) >= grant["capacity"] or same_slot:
                found.append({"grant": _brief(grant),
                              "open": [_brief(holds[j]) for j in sorted(open_)]})
            open_.add(i)
    return found


def phantom(grant: dict[str, Any]) -> bool:
    """A lease handed out for no grant at all (no token, no slot): see :func:`check`."""
    return grant["token"] <= 0 or grant["slot"] < 0


def duplicate_tokens(grants: list[dict[str, Any]]) -> int:
    """Grants of a lock that received a token already granted (a double grant)."""
    seen: set[tuple[str, int]] = set()
    twice = 0
    for grant in (g for g in grants if not phantom(g)):
        key = (grant["lock"], grant["token"])
        twice += key in seen
        seen.add(key)
    return twice


def _brief(grant: dict[str, Any]) -> dict[str, Any]:
    keys = ("lock", "slot", "token", "worker", "alias", "first_valid", "last_valid", "lost_at")
    return {key: grant.get(key) for key in keys}


def check(records: list[dict[str, Any]], faults: list[dict[str, Any]],
          started: float, ended: float) -> dict[str, Any]:
    grants = [r for r in records if r["kind"] == "grant"]
    writes = [w for g in grants for w in g["writes"]]
    late = [(g, w) for g in grants if g["lost_at"] is not None
            for w in g["writes"] if w[0] > g["lost_at"]]
    by_process: dict[str, list[float]] = defaultdict(list)
    for grant in grants:
        by_process[grant["worker"].split("-")[0]].append(grant["granted"])
    for fault in faults:
        after = [min((t for t in times if t >= fault["healed"]), default=None)
                 for times in by_process.values()]
        fault["recovery"] = (None if not after or None in after
                             else round(max(after) - fault["healed"], 2))
    found = overlaps(grants)
    return {
        "grants": len(grants),
        "grants_per_s": round(len(grants) / max(ended - started, 1e-9), 1),
        "overlaps": len(found),
        "duplicate_tokens": duplicate_tokens(grants),
        "phantoms": sum(1 for g in grants if phantom(g)),
        "phantoms_valid": sum(1 for g in grants if phantom(g) and g["first_valid"] is not None),
        "phantom_examples": [_brief(g) | {"granted": g["granted"], "released": g.get("released")}
                             for g in grants if phantom(g)][:5],
        "overlap_examples": found[:5],
        "writes": len(writes),
        "fenced": sum(1 for w in writes if w[1] is False),
        "store_errors": sum(1 for w in writes if w[1] is None),
        "lost": sum(1 for g in grants if g["lost_at"] is not None or g.get("expired")),
        "lost_then_wrote": len(late),
        "lost_then_wrote_examples": [_brief(g) | {"write_at": w[0]} for g, w in late[:5]],
        "lock_errors": sum(1 for r in records if r["kind"] == "error"),
        "faults": faults,
        "processes": sorted(by_process),
    }
