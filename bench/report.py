"""Write benchmark tables into docs/benchmarks.md, one section per benchmark.

Each section carries the date, the machine and its load average when it was
written. A section may also carry its headline numbers as a JSON comment
(``data=``); ``python -m bench.report`` rebuilds the per-database summary
from the ``locks-roundtrip-<database>`` and ``makespan-<database>`` sections,
so that runs on SQLite, PostgreSQL and MariaDB land side by side.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Written by `bash scripts/bench.sh` (each section by its own script under `bench/`; run it once
per database: `TEST_DB=sqlite|postgres|mariadb`). Numbers are medians of the stated rounds,
measured side by side in one run. Each section states when it was measured and the machine's
load average at the time.
"""
DATA = re.compile(r"<!-- data: (\{.*?\}) -->")
DATABASES = {"sqlite": "SQLite", "postgresql": "PostgreSQL", "mariadb": "MariaDB",
             "mysql": "MySQL"}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    kernel = platform.release()
    cores = os.cpu_count()
    try:
        memory = subprocess.run(["free", "-g"], capture_output=True, text=True,
                                check=False).stdout.split("\n")[1].split()[1] + " GiB"
    except (OSError, IndexError):
        memory = "?"
    # A shared machine skews every absolute number; the ratios of interleaved
    # variants hold up better. Say how loaded it was.
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"{cpu}, {cores} cores, {memory} RAM, Linux {kernel}, "
            f"Python {platform.python_version()}; load average {load} (1, 5, 15 min)")


def database() -> str:
    """The default database's kind: sqlite, postgresql, mariadb or mysql."""
    from django.db import connection

    if connection.vendor == "mysql":
        connection.ensure_connection()
        return "mariadb" if connection.mysql_is_mariadb else "mysql"
    return connection.vendor


def write_section(key: str, title: str, body: str, data: dict | None = None,
                  verb: str = "Measured") -> None:
    """Replace (or append) the section marked ``key`` in docs/benchmarks.md."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    payload = f"<!-- data: {json.dumps(data, sort_keys=True)} -->\n" if data else ""
    section = (f"<!-- {key} -->\n## {title}\n\n{verb} {stamp} on {machine()}.\n\n"
               f"{body.strip()}\n{payload}<!-- /{key} -->\n")
    text = DOC.read_text() if DOC.exists() else HEADER
    pattern = re.compile(rf"<!-- {re.escape(key)} -->.*?<!-- /{re.escape(key)} -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else \
        text.rstrip("\n") + "\n\n" + section
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(section)


def section_data(prefix: str) -> dict[str, tuple[str, dict]]:
    """``{suffix: (measured stamp, data)}`` of every section whose key is prefix-suffix."""
    found = {}
    text = DOC.read_text() if DOC.exists() else ""
    for match in re.finditer(rf"<!-- {re.escape(prefix)}-([\w-]+) -->(.*?)<!-- /", text, re.S):
        data = DATA.search(match.group(2))
        stamp = re.search(r"Measured (\d{4}-\d\d-\d\d \d\d:\d\d UTC)", match.group(2))
        if data and stamp:
            found[match.group(1)] = (stamp.group(1), json.loads(data.group(1)))
    return found


def per_database() -> None:
    """The database lock round and the makespan side by side, from the sections' data."""
    rounds, makespans = section_data("locks-roundtrip"), section_data("makespan")
    rows = ["| database | lock round measured | bare INSERT + DELETE (ms) | ours: backend (ms) "
            "| ratio | ours: `lock()` API (ms) | ratio | makespan measured | makespan, "
            "database lock (s) | x ideal | makespan, Redis lock, same run (s) | database / Redis |",
            "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for db in [name for name in DATABASES if name in rounds or name in makespans]:
        cells = [DATABASES[db]]
        if db in rounds:
            stamp, r = rounds[db]
            cells += [stamp, f"{r['raw_ms']:.2f}", f"{r['ours_ms']:.2f}",
                      f"{r['ours_ms'] / r['raw_ms']:.2f}x", f"{r['api_ms']:.2f}",
                      f"{r['api_ms'] / r['raw_ms']:.2f}x"]
        else:
            cells += ["not run"] + [""] * 5
        if db in makespans:
            stamp, m = makespans[db]
            cells += [stamp, f"{m['database_s']:.2f}", f"{m['database_s'] / m['ideal_s']:.2f}x",
                      f"{m['redis_s']:.2f}", f"{m['database_s'] / m['redis_s']:.2f}x"]
        else:
            cells += ["not run"] + [""] * 4
        rows.append("| " + " | ".join(cells) + " |")
    body = ("Filled by `python -m bench.report` from the per-database sections below "
            "(one `bash scripts/bench.sh` run per `TEST_DB`; each run's date, machine and "
            "load are in its own sections). Lock round: the database backend's "
            "acquire+release against a bare INSERT + DELETE of a lease row, interleaved in "
            "one run. Makespan: 200 tasks of 50 ms through a capacity-4 semaphore, default "
            "lock policy (ideal 2.5 s); the Redis-lock makespan of the same run shows how "
            "much of a difference is the database and how much the machine at that time.\n\n"
            + "\n".join(rows))
    write_section("per-database", "Database lock round and makespan per database", body,
                  verb="Collected")


if __name__ == "__main__":
    per_database()
