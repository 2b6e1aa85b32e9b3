"""Write benchmark tables into docs/benchmarks.md, one section per benchmark."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Written by `bash scripts/bench.sh` (each section by its own script under `bench/`).
Numbers are medians of the stated rounds, measured side by side in one run.
"""


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
    return (f"{cpu}, {cores} cores, {memory} RAM, Linux {kernel}, "
            f"Python {platform.python_version()}")


def write_section(key: str, title: str, body: str) -> None:
    """Replace (or append) the section marked ``key`` in docs/benchmarks.md."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"<!-- {key} -->\n## {title}\n\nMeasured {stamp} on {machine()}.\n\n"
               f"{body.strip()}\n<!-- /{key} -->\n")
    text = DOC.read_text() if DOC.exists() else HEADER
    pattern = re.compile(rf"<!-- {key} -->.*?<!-- /{key} -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else \
        text.rstrip("\n") + "\n\n" + section
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(section)
