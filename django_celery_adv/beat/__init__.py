"""Celery beat on every host: ``LockedScheduler`` elects one leader per app.

* :mod:`.scheduler`: the scheduler (fenced, written-ahead sends; per-app schedules;
  locked periodic tasks skipped while busy);
* :mod:`.leadership`: the leadership lease and its fence;
* :mod:`.health`: each beat's health row and the per-app summary;
* :mod:`.config`: the ``CELERY_ADV["BEAT"]`` settings of one app.

``LockedScheduler`` is imported on first access, so the settings and health
modules (checks, admin, ``celery_status``) do not import django-celery-beat's
scheduler.
"""

from typing import Any

__all__ = ["APP_HEADER", "TOKEN_HEADER", "LockedScheduler"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import scheduler

        return getattr(scheduler, name)
    raise AttributeError(name)
