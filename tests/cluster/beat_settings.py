"""Django settings of the beat processes of a cluster beat run (``tests/cluster/beat.py``).

Read from the environment the run sets: ``JEPSEN_BEAT`` (JSON: backend, node
alias, TTL, database and broker), so one module serves every beat. The
database and the broker are reached through the relays on the bridge address
when the beat runs in a client namespace (``JEPSEN_ROOT=0`` for the run's own
process in the root namespace, which migrates and writes the schedule).
"""

import json
import os

from tests.cluster import topology
from tests.cluster.client import backend_settings

_RUN = json.loads(os.environ.get("JEPSEN_BEAT") or "{}")
_IN_NS = os.environ.get("JEPSEN_ROOT") != "1"

SECRET_KEY = "cluster-beat-only"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth",
                  "django_celery_beat", "django_celery_adv"]
DATABASES = {"default": {
    "ENGINE": "django.db.backends.postgresql", "NAME": _RUN.get("database", "postgres"),
    "HOST": topology.ROOT if _IN_NS else "127.0.0.1",
    "PORT": topology.RELAY_PORT if _IN_NS else 5432, "USER": "postgres"}}
_BROKER = (f"redis://{topology.ROOT}:{topology.BROKER_RELAY_PORT}" if _IN_NS
           else "redis://127.0.0.1:6379") + f"/{_RUN.get('redis_db', 8)}"
_BACKENDS = {"default": {"BACKEND": "django_celery_adv.locks.backends.database.DatabaseBackend"},
             **(backend_settings(_RUN["backend"], _RUN) if _RUN else {})}
CELERY_ADV = {
    "APPS": {"default": {"broker_url": _BROKER, "broker_connection_retry_on_startup": True}},
    "LOCK_BACKENDS": _BACKENDS,
    "BEAT": {"LOCK_BACKEND": _RUN.get("alias", "default"), "TTL": _RUN.get("beat_ttl", 6)},
}
LOGGING_CONFIG = None
