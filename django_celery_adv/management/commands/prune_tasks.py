"""``manage.py prune_tasks [--app ALIAS ...] [--days N] [--keep N] [--dry-run]``.

Applies the task-history retention (``CELERY_ADV["EVENTS"]`` ``RETENTION_DAYS``
and ``RETENTION_COUNT``, per app) once; the options override the settings.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from django_celery_adv import conf, events


class Command(BaseCommand):
    help = gettext_lazy("Delete task records not updated for RETENTION_DAYS and all but the "
                        "newest RETENTION_COUNT per app (CELERY_ADV['EVENTS']).")

    def add_arguments(self, parser):
        parser.add_argument("--app", action="append", dest="aliases", metavar="ALIAS")
        parser.add_argument("--days", type=float, default=None,
                            help=_("Keep records updated within this many days."))
        parser.add_argument("--keep", type=int, default=None,
                            help=_("Keep this many newest records per app."))
        parser.add_argument("--dry-run", action="store_true", help=_("Only count."))

    def handle(self, *args, aliases, days, keep, dry_run, **options) -> None:
        configured = list(conf.app_settings())
        unknown = sorted(set(aliases or ()) - set(configured))
        if unknown:
            raise CommandError(f"unknown app alias(es): {', '.join(unknown)}", returncode=2)
        if (days is not None and days < 0) or (keep is not None and keep < 0):
            raise CommandError("--days and --keep must be >= 0", returncode=2)
        overrides = {"dry_run": dry_run}
        if days is not None:
            overrides["days"] = days
        if keep is not None:
            overrides["keep"] = keep
        try:
            results = events.prune_apps(aliases or configured, **overrides)
        except DatabaseError as e:
            raise CommandError(f"database unavailable: {e}") from e
        verb = "would delete" if dry_run else "deleted"
        for alias, result in results.items():
            self.stdout.write(f"{alias}: {verb} {result.by_age} record(s) by age, "
                              f"{result.by_count} by count")
