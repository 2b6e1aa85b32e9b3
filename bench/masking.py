"""``mask_text`` now vs before the linear rewrite (commit 6778b34), side by side.

Run from the repository root (needs git for the old version)::

    .venv/bin/python -m bench.masking

The old module is read with ``git show 6778b34:django_celery_adv/masking.py``
into ``build/bench/old_masking.py`` at run time and imported from there; no
copy of it is kept in the repository. Each case is timed ``BENCH_ROUNDS``
times (``BENCH_MASK_ROUNDS``, default 5), old and new interleaved so drift hits both alike, and the
median is written as a markdown table with the old/new ratio to the ``masking``
section of docs/benchmarks.md (bench/report.py).

Cases: 1 MB of mixed text (traceback lines, broker URLs with passwords,
``key=value`` pairs, prose); 10,000 short error messages; 1 MB shown through
``limit=4000`` as the failure recorder shows a message (the old code masks it
all, then cuts); 8 kB of word characters, the input that made the old code
quadratic (it is not run at 1 MB: that would take hours).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
OLD_COMMIT = "6778b34"
ROUNDS = int(os.environ.get("BENCH_MASK_ROUNDS", "5"))
MB = 1_000_000


def load_old() -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:django_celery_adv/masking.py"], cwd=ROOT,
        capture_output=True, text=True, check=True).stdout
    path = ROOT / "build" / "bench" / "old_masking.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_masking", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mixed_text(size: int) -> str:
    lines = [
        'Traceback (most recent call last):',
        '  File "/srv/app/reports/tasks.py", line 42, in build_report',
        '    rows = fetch(url, timeout=30)',
        "kombu.exceptions.OperationalError: Error 111 connecting to "
        "redis://worker:Sup3r-s3cret@10.0.0.5:6379/0. Connection refused.",
        "request failed: {'user': 'alice', 'password': 'hunter22', 'page': 3}",
        "retrying with api_key=AKIAEXAMPLE123 region=eu-west-1 attempt=2",
        "The quick brown fox jumps over the lazy dog while the queue drains slowly.",
        "amqp://guest:guest@rabbit.internal:5672// is unreachable (timed out)",
    ]
    block = "\n".join(lines) + "\n"
    return (block * (size // len(block) + 1))[:size]


def short_messages(count: int) -> list[str]:
    shapes = [
        "Error {i} connecting to redis://:pw{i}@127.0.0.1:6379/0.",
        "Task reports.build[{i}] raised ValueError('bad row {i}')",
        "token={i}abcdef expired",
        "Timeout after 30s waiting for lock 'nightly-{i}'",
        "{{'password': 'p{i}', 'user': 'u{i}'}}",
    ]
    return [shapes[i % len(shapes)].format(i=i) for i in range(count)]


def _timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from django_celery_adv import masking as new

    old = load_old()
    text = mixed_text(MB)
    messages = short_messages(10_000)
    words = "a" * 8_000
    cases: list[tuple[str, Callable[[ModuleType], object]]] = [
        ("1 MB mixed text", lambda m: m.mask_text(text)),
        ("10,000 short messages", lambda m: [m.mask_text(s) for s in messages]),
        ("1 MB, 4,000 chars shown",
         lambda m: m.mask_text(text, limit=4000) if m is new else m.mask_text(text)[:4000]),
        ("8 kB of word characters", lambda m: m.mask_text(words)),
    ]
    assert new.mask_text(text).count(new.MASK) >= old.mask_text(text).count(old.MASK)
    from bench.report import write_section

    rows = ["| case | old (s) | new (s) | old / new |", "|---|---:|---:|---:|"]
    for name, case in cases:
        times = {"old": [], "new": []}
        for _ in range(ROUNDS):  # interleaved
            times["old"].append(_timed(lambda case=case: case(old)))
            times["new"].append(_timed(lambda case=case: case(new)))
        old_s, new_s = statistics.median(times["old"]), statistics.median(times["new"])
        rows.append(f"| {name} | {old_s:.4f} | {new_s:.4f} | {old_s / new_s:,.0f}x |")
        print(rows[-1], flush=True)
    write_section(
        "masking", "`mask_text`: before and after the linear rewrite",
        f"`masking.mask_text` now against commit {OLD_COMMIT} (read from git at run time), "
        f"median of {ROUNDS} runs each, old and new interleaved (`python -m bench.masking`). "
        "1 MB of mixed text (traceback lines, broker URLs with passwords, `key=value` "
        "pairs, prose); 10,000 short error messages one by one; 1 MB shown through "
        "`limit=4000` as the failure recorder shows it (the old code masks all of it, then "
        "cuts); 8 kB of word characters, the input that made the old code quadratic (not "
        "run at 1 MB: the old code would take hours).\n\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
