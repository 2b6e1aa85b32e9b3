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
    # Beat leadership (django_celery_adv.beat); "APPS" maps an app alias to
    # overrides of the other keys for that app's beats.
    "BEAT": {
        "LOCK_BACKEND": DEFAULT_LOCK_BACKEND_ALIAS,
        "TTL": 10.0,
        "MISFIRE_GRACE": None,
        "ON_BUSY": "skip",
        "APPS": {},
    },
}

# Keys whose value is a dict merged key by key over the default, so a project
# can override one lock default without restating the others.
_MERGED_DICTS = ("LOCK_DEFAULTS",)


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


def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING_NAME:
        get_config.cache_clear()


setting_changed.connect(_reset, dispatch_uid="django_celery_adv.conf.reset")
