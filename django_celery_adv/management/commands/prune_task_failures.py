"""``manage.py prune_task_failures [--days N] [--dry-run]``: apply the retention period."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from django_celery_adv import conf, failures


class Command(BaseCommand):
    help = gettext_lazy("Delete per-day task-failure counts older than the retention period, "
                        "and the failure groups not seen for as long "
                        "(CELERY_ADV['FAILURE_RETENTION_DAYS']).")

    def add_arguments(self, parser):
        parser.add_argument("--days", type=int, default=None,
                            help=_("Retention in days (default: FAILURE_RETENTION_DAYS, "
                                   "%(days)s unless set).")
                            % {"days": conf.DEFAULTS["FAILURE_RETENTION_DAYS"]})
        parser.add_argument("--dry-run", action="store_true",
                            help=_("Only count what would be deleted."))

    def handle(self, *args, days: int | None, dry_run: bool, **options) -> None:
        try:
            result = failures.prune(days, dry_run=dry_run)
        except ValueError as e:
            raise CommandError(str(e)) from e
        days = conf.get("FAILURE_RETENTION_DAYS") if days is None else days
        text = (_("Would delete %(groups)d failure group(s) and %(counts)d per-day count(s) "
                  "older than %(days)d day(s).") if dry_run else
                _("Deleted %(groups)d failure group(s) and %(counts)d per-day count(s) "
                  "older than %(days)d day(s)."))
        self.stdout.write(self.style.SUCCESS(
            text % {"groups": result.groups, "counts": result.days, "days": days}))
