"""Run a real second process with its clock moved, by Debian's ``faketime``.

``faketime -f '+5s'`` shifts what the process reads from the wall clock
(``time.time()``, ``datetime.now()``) by five seconds; its monotonic clock
is shifted too, but a lease's validity only ever compares two readings of
it, so an offset cancels out there, as it would on a host whose clock is wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def faketime_path() -> str:
    path = shutil.which("faketime")
    if path is None:
        raise RuntimeError("faketime is not installed: apt-get install faketime "
                           "(scripts/test.sh installs it)")
    return path


def run_with_clock(offset: str, code: str, timeout: float = 60, env: dict | None = None):
    """Run ``code`` in a new Python process whose clock is moved by ``offset``
    (faketime syntax: ``"+5s"``, ``"-5s"``) with the test settings loaded;
    the code prints one JSON document, which is returned."""
    child_env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
                 "TEST_USE_TEST_DB": "1", **(env or {})}
    prelude = "import django; django.setup()\n"
    result = subprocess.run([faketime_path(), "-f", offset, sys.executable, "-c", prelude + code],
                            cwd=REPO, env=child_env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"process under faketime {offset} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
