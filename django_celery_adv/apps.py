"""App config: wires checks and signals; does no I/O."""

from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class CeleryAdvConfig(AppConfig):
    name = "django_celery_adv"
    verbose_name = _("Celery")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core.checks import Tags, register

        from . import (
            checks,  # noqa: F401  (registers the system checks)
            failures,
            labels,
            logconfig,
        )
        from .locks.checks_database import check_database_lock_backend
        from .locks.definitions import connect_signals
        from .registry import install_default_app

        register(Tags.compatibility)(check_database_lock_backend)
        labels.install(self)
        install_default_app()
        # Before any worker or beat starts: Celery sends setup_logging while it
        # boots, and task_failure from the first task on.
        logconfig.connect()
        failures.connect()
        connect_signals()
