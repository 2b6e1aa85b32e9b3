"""Benchmark settings: the test settings on a database, Redis db and vhost of their own.

``TEST_DB=sqlite|postgres|mariadb`` picks the database as in tests/settings.py.
The benchmark database is ``build/bench/bench.sqlite3`` on SQLite and
``celery_adv_bench`` on PostgreSQL and MariaDB (scripts/bench.sh creates it
when missing). Redis db 6 (broker, results and the Redis lock backend: the
benchmarks flush it) and the RabbitMQ vhost ``bench`` keep the benchmark's
workers off the test suite's queues and broadcasts; override with the usual
``TEST_REDIS_URL``, ``TEST_REDIS_LOCK_URL`` and ``TEST_AMQP_URL``.
"""

import os

os.environ.setdefault("TEST_REDIS_URL", "redis://127.0.0.1:6379/6")
os.environ.setdefault("TEST_REDIS_LOCK_URL", "redis://127.0.0.1:6379/6")
os.environ.setdefault("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/bench")

from tests.settings import *  # noqa: F403
from tests.settings import BUILD_DIR, DATABASES

if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    DATABASES["default"]["NAME"] = BUILD_DIR.parent / "bench" / "bench.sqlite3"
    DATABASES["default"]["NAME"].parent.mkdir(parents=True, exist_ok=True)
else:
    DATABASES["default"]["NAME"] = "celery_adv_bench"
