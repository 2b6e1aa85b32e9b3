"""Settings of the beat processes the beat tests (and ``bench/beat_failover.py``) start.

The settings of ``TEST_BEAT_BASE_SETTINGS`` (default: the test settings), plus:
``CELERY_ADV["BEAT"]`` from the ``TEST_BEAT`` env var (JSON); with
``TEST_BEAT_FAULT_REDIS_URL``, a ``fault`` lock backend on a test's own Redis;
with ``TEST_BEAT_EXTRA_APP_SETTINGS`` (JSON), more Celery settings for every app
(the benchmark's celery-redbeat configuration and static schedule).
"""

import faulthandler
import importlib
import json
import os
import signal

globals().update({name: value for name, value in vars(importlib.import_module(
    os.environ.get("TEST_BEAT_BASE_SETTINGS", "tests.settings"))).items()
    if name.isupper()})

CELERY_ADV["BEAT"] = json.loads(os.environ.get("TEST_BEAT") or "{}")  # noqa: F821
if os.environ.get("TEST_BEAT_FAULT_REDIS_URL"):
    CELERY_ADV["LOCK_BACKENDS"]["fault"] = {  # noqa: F821
        "BACKEND": "django_celery_adv.locks.backends.redis.RedisBackend",
        "OPTIONS": {"url": os.environ["TEST_BEAT_FAULT_REDIS_URL"], "prefix": "beat-fault:"}}
for _app in CELERY_ADV["APPS"].values():  # noqa: F821
    _app["imports"] = ["tests.testapp.beat_tasks"]
    _app.update(json.loads(os.environ.get("TEST_BEAT_EXTRA_APP_SETTINGS") or "{}"))

# A hung beat dumps its threads into its log on SIGUSR1.
faulthandler.register(signal.SIGUSR1, all_threads=True)
