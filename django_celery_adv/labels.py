"""Translated labels for the names Django derives in English from code.

A field without ``verbose_name`` is labelled with its attribute name
(``task_name`` -> "task name"), a model without ``verbose_name_plural`` with its
verbose name plus "s": English whatever the active language. Writing
``verbose_name=`` in ``models.py`` instead would change the migration state (it
records explicit names) and need an ``AlterField``/``AlterModelOptions`` with no
schema change. :func:`install` (called by the app config's ``ready``) sets these
lazy labels on the fields and model options the way Django sets the derived
ones, so forms, the admin and messages show them translated while migrations
(which read the names as written) see no change. An explicit ``verbose_name``
always wins: only derived names are replaced.
"""

from __future__ import annotations

from django.apps import AppConfig
from django.utils.functional import Promise
from django.utils.translation import gettext_lazy as _

#: Attribute name -> label, for our models' fields that have no ``verbose_name``.
FIELD_LABELS: dict[str, Promise] = {
    "name": _("name"),
    "backend": _("backend"),
    "capacity": _("capacity"),
    "retry_backoff": _("retry backoff"),
    "max_retries": _("max retries"),
    "on_busy": _("on busy"),
    "description": _("description"),
    "created_at": _("created at"),
    "updated_at": _("updated at"),
    "fingerprint": _("fingerprint"),
    "task_name": _("task name"),
    "location": _("location"),
    "count": _("count"),
    "first_seen": _("first seen"),
    "last_seen": _("last seen"),
    "last_message": _("last message"),
    "last_traceback": _("last traceback"),
    "last_task_id": _("last task id"),
    "last_args": _("last args"),
    "last_kwargs": _("last kwargs"),
    "resolved": _("resolved"),
    "resolved_at": _("resolved at"),
    "hostname": _("hostname"),
    "pid": _("pid"),
    "role": _("role"),
    "leader_since": _("leader since"),
    "lock_backend": _("lock backend"),
    "started_at": _("started at"),
    "last_tick": _("last tick"),
    "next_due_at": _("next due at"),
    "periodic_task": _("periodic task"),
    "state": _("state"),
    "worker": _("worker"),
    "args": _("args"),
    "kwargs": _("kwargs"),
    "retryable": _("retryable"),
    "result": _("result"),
    "exception": _("exception"),
    "traceback": _("traceback"),
    "retries": _("retries"),
}

#: Model name -> (verbose name or None to keep the model's, verbose name plural).
MODEL_LABELS: dict[str, tuple[Promise | None, Promise]] = {
    "lockdefinition": (_("lock definition"), _("lock definitions")),
    "lockfence": (None, _("lock fencing counters")),
    "locklease": (None, _("lock leases")),
    "lockdefinitionchange": (None, _("lock definition change trackers")),
    "taskfailure": (None, _("task failures")),
    "periodictaskapp": (None, _("periodic task apps")),
    "taskrecord": (None, _("tasks")),
}


def install(app_config: AppConfig) -> None:
    """Give the app's models and fields the translated labels of the tables above."""
    for model in app_config.get_models():
        opts = model._meta
        singular, plural = MODEL_LABELS.get(opts.model_name, (None, None))
        if singular is not None and "verbose_name" not in opts.original_attrs:
            opts.verbose_name = singular
        if plural is not None and "verbose_name_plural" not in opts.original_attrs:
            opts.verbose_name_plural = plural
        for field in opts.fields:
            if field._verbose_name is None and field.name in FIELD_LABELS:
                field.verbose_name = FIELD_LABELS[field.name]
