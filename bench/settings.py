"""Benchmark settings: the test settings on a database and Redis db of their own."""

import os

os.environ.setdefault("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
os.environ.setdefault("TEST_REDIS_LOCK_URL", "redis://127.0.0.1:6379/14")

from tests.settings import *  # noqa: F403
from tests.settings import BUILD_DIR, DATABASES

if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    DATABASES["default"]["NAME"] = BUILD_DIR.parent / "bench" / "bench.sqlite3"
    DATABASES["default"]["NAME"].parent.mkdir(parents=True, exist_ok=True)
else:
    DATABASES["default"]["NAME"] = "celery_adv_bench"
