"""The checker finds what it must (no cluster needed): an overlap, a double grant,
a write after a reported loss, a fault nobody recovered from."""

from __future__ import annotations

from tests.cluster import checker


def grant(worker: str, start: float, end: float, *, token: int, slot: int = 0,
          capacity: int = 1, lost_at: float | None = None,
          writes: list | None = None) -> dict:
    return {"kind": "grant", "lock": "L", "capacity": capacity, "slot": slot, "token": token,
            "worker": f"{worker}-L-0", "alias": "a", "granted": start, "first_valid": start,
            "last_valid": end, "lost_at": lost_at, "writes": writes or [[start, True]],
            "expired": False}


def test_overlap_double_grant_and_lost_then_wrote_are_found() -> None:
    records = [grant("c1a", 1.0, 2.0, token=5),
               grant("c2a", 1.5, 1.6, token=5),                      # inside c1a's hold
               grant("c1b", 3.0, 3.0, token=7),                      # one valid check
               grant("c2b", 3.5, 4.0, token=8, lost_at=3.8,
                     writes=[[3.6, True], [3.9, False]])]            # wrote after the loss
    phantoms = [grant(w, 3.1, 3.1, token=0, slot=-1) | {"first_valid": None, "writes": []}
                for w in ("c1a", "c2a")]  # acquire returned a lease for no grant, twice
    result = checker.check(records + phantoms, [{"healed": 3.2}], 0.0, 4.0)
    assert result["phantoms"] == 2
    assert result["overlaps"] == 1
    assert result["overlap_examples"][0]["grant"]["worker"].startswith("c2a")
    assert result["duplicate_tokens"] == 1
    assert result["lost_then_wrote"] == 1 and result["fenced"] == 1
    assert result["faults"][0]["recovery"] is None  # c1a and c2a never got a grant again


def test_semaphore_counts_capacity_and_slots() -> None:
    sem = [grant(f"c{i}", 1.0, 2.0, token=i, slot=i, capacity=3) for i in range(3)]
    assert checker.check(sem, [], 0, 2)["overlaps"] == 0
    fourth = grant("c9", 1.5, 1.7, token=9, slot=3, capacity=3)
    same_slot = grant("c8", 2.5, 2.7, token=10, slot=0, capacity=3)
    later = grant("c7", 2.6, 2.8, token=11, slot=0, capacity=3)
    result = checker.check([*sem, fourth, same_slot, later], [{"healed": 0.5}], 0, 3)
    assert result["overlaps"] == 2  # over capacity; then slot 0 held twice
    assert result["faults"][0]["recovery"] == 2.1  # c7, the last process granted again
