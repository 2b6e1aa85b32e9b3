"""Task history from Celery events, for every configured app (issue 10).

* :mod:`.merge`: events -> record fields, Celery's state-precedence merge (pure);
* :mod:`.store`: batched upserts into :class:`~django_celery_adv.models.TaskRecord`,
  the per-app counters in :class:`~django_celery_adv.models.TaskRecorderStats`,
  retention;
* :mod:`.recorder`: the consumer/writer threads run by ``manage.py celery_events``.

Readers in other processes use :func:`worker_counters` (the workers page's
succeeded / failed / retried / processed and load average) and
:func:`recorder_stats` (``/metrics``: events seen / written / dropped, last
event time, per-name state counts). Settings: ``CELERY_ADV["EVENTS"]``
(defaults in :mod:`django_celery_adv.conf`), :func:`settings_for` merges an
app's overrides.
"""

from __future__ import annotations

from typing import Any

from .. import conf
from .store import WorkerCounters, prune, recorder_stats, worker_counters, worker_counters_by_app

__all__ = ["WorkerCounters", "prune", "prune_apps", "recorder_stats", "settings_for",
           "worker_counters", "worker_counters_by_app"]


def settings_for(alias: str) -> dict[str, Any]:
    """``CELERY_ADV["EVENTS"]`` for one app: defaults, the project's values, the app's own."""
    defaults = {k: v for k, v in conf.DEFAULTS["EVENTS"].items() if k != "APPS"}
    raw = conf.get("EVENTS")
    raw = raw if isinstance(raw, dict) else {}
    per_app = raw.get("APPS") if isinstance(raw.get("APPS"), dict) else {}
    own = per_app.get(alias) if isinstance(per_app.get(alias), dict) else {}
    return {**defaults, **{k: v for k, v in raw.items() if k in defaults}, **own}


def prune_apps(aliases: list[str] | None = None, **overrides: Any) -> dict:
    """Apply retention to ``aliases`` (default: every app); ``days``/``keep``/``dry_run``."""
    from .store import prune_all

    return prune_all(aliases or list(conf.app_settings()), settings_for, **overrides)
