"""The one place that reads ``settings.CELERY_ADV``.

Everything else asks this module. The merged dict is cached and dropped on
``setting_changed`` so ``override_settings`` works in tests. Reading never
raises on a bad value: validation is the job of :mod:`django_celery_adv.checks`,
which reports each mistake as a system-check message instead of a traceback.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed

SETTING_NAME = "CELERY_ADV"
DEFAULT_APP_ALIAS = "default"
DEFAULT_LOCK_BACKEND_ALIAS = "default"
DATABASE_LOCK_BACKEND = "django_celery_adv.locks.backends.database.DatabaseBackend"

DEFAULTS: dict[str, Any] = {
    "APPS": {},
    "TASK_APPS": {},
    "LOCK_BACKENDS": {DEFAULT_LOCK_BACKEND_ALIAS: {"BACKEND": DATABASE_LOCK_BACKEND}},
    "LOCK_DEFAULTS": {
        "TTL": 60,
        "RETRY_COUNTDOWN": 5,
        "RETRY_JITTER": 1,
        "RETRY_BACKOFF": False,
        "WAIT": 5.0,
        "MAX_RETRIES": None,
    },
    "LOGGING": None,
    "RECORD_FAILURES": True,
    "FAILURE_RETENTION_DAYS": 90,
    "INSPECT_TIMEOUT": 1.0,
    # Task history from events (django_celery_adv.events, manage.py celery_events);
    # "APPS" maps an app alias to overrides of the other keys for that app.
    "EVENTS": {
        "RETENTION_DAYS": 7,           # records not updated for this long are pruned (None: never)
        "RETENTION_COUNT": 100_000,    # newest records kept per app (None: no limit)
        "MAX_PENDING": 10_000,         # tasks buffered per app before events are dropped
        "ENABLE_EVENTS_INTERVAL": 60,  # s between enable_events broadcasts (0: never)
        "QUEUE_EXPIRES": 60,           # s the event queue outlives the recorder (AMQP)
        "PRUNE_INTERVAL": 3600,        # s between prunes by the recorder (0: never)
        "APPS": {},
    },
    # Fleet readings (django_celery_adv.monitoring): sharing, grace, how long
    # a silent worker is kept, tolerated and listed.
    "MONITORING": {
        # A reading younger than this is reused by pages, commands, metrics (0: never).
        "READING_MAX_AGE": 3.0,
        # Extra listening for unknown workers once every known one has answered.
        "NEWCOMER_GRACE": 0.05,
        # The health exit code tolerates a worker silent now but seen this recently.
        "SILENT_WINDOW": 60.0,
        # A silent worker is "no reply" this long after it was last seen, then "offline".
        "OFFLINE_AFTER": 60.0,
        # A worker silent this long is dropped from the seen-workers record.
        "FORGET_AFTER": 900.0,
        # Rows per page on the admin workers page.
        "PAGE_SIZE": 100,
    },
    # Beat leadership (django_celery_adv.beat); "APPS" maps an app alias to
    # overrides of the other keys for that app's beats.
    "BEAT": {
        "LOCK_BACKEND": DEFAULT_LOCK_BACKEND_ALIAS,
        "TTL": 10.0,
        "MISFIRE_GRACE": None,
        "ON_BUSY": "skip",
        "APPS": {},
    },
    # The /metrics view (django_celery_adv.metrics): TOKEN lets a Prometheus server
    # in with "Authorization: Bearer <TOKEN>" (None: only users with the
    # view_monitoring permission); a scrape waits for the brokers (queue lengths)
    # and the lock servers (holders) at most SERVER_TIMEOUT + 1 seconds; the runtime
    # and queue-wait histograms count the tasks finished in the last HISTOGRAM_WINDOW
    # seconds.
    "METRICS": {
        "TOKEN": None,
        "SERVER_TIMEOUT": 1.0,
        "HISTOGRAM_WINDOW": 300,
    },
}

# Keys whose value is a dict merged key by key over the default, so a project
# can override one lock default without restating the others.
_MERGED_DICTS = ("LOCK_DEFAULTS", "MONITORING", "METRICS")


def user_settings() -> Any:
    """The raw ``CELERY_ADV`` value as the project wrote it (``{}`` if absent)."""
    return getattr(settings, SETTING_NAME, {})


@functools.cache
def get_config() -> dict[str, Any]:
    """Defaults with the project's ``CELERY_ADV`` laid over them.

    A value of the wrong type is passed through untouched; the system checks
    name it. Only a non-dict ``CELERY_ADV`` falls back to the defaults here.
    """
    config = copy.deepcopy(DEFAULTS)
    raw = user_settings()
    if not isinstance(raw, dict):
        return config
    for key, value in raw.items():
        if key in _MERGED_DICTS and isinstance(value, dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def get(key: str) -> Any:
    """One merged setting, e.g. ``conf.get("INSPECT_TIMEOUT")``."""
    return get_config()[key]


def app_settings() -> dict[str, dict[str, Any]]:
    """``APPS``: alias -> Celery settings; empty if malformed (checks report it)."""
    value = get("APPS")
    return value if isinstance(value, dict) else {}


def task_apps() -> dict[str, str]:
    """``TASK_APPS``: task-name glob -> alias; empty if malformed."""
    value = get("TASK_APPS")
    return value if isinstance(value, dict) else {}


def lock_backend_settings() -> dict[str, dict[str, Any]]:
    """``LOCK_BACKENDS``: alias -> {"BACKEND": dotted path, "OPTIONS": {...}}."""
    value = get("LOCK_BACKENDS")
    return value if isinstance(value, dict) else {}


def monitoring(key: str) -> Any:
    """One ``MONITORING`` value; the default when the project's value is malformed
    (the checks report it, E017/E018)."""
    value = get("MONITORING")
    default = DEFAULTS["MONITORING"][key]
    if not isinstance(value, dict):
        return default
    found = value.get(key, default)
    number = isinstance(found, int | float) and not isinstance(found, bool)
    return found if number and found >= 0 else default


def metrics(key: str) -> Any:
    """One ``METRICS`` value as written (the checks report a bad one, E019), or its default."""
    value = get("METRICS")
    return value.get(key, DEFAULTS["METRICS"][key]) if isinstance(value, dict) \
        else DEFAULTS["METRICS"][key]


def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING_NAME:
        get_config.cache_clear()


setting_changed.connect(_reset, dispatch_uid="django_celery_adv.conf.reset")
