"""``manage.py prune_task_failures [--days N] [--dry-run]``: apply the retention period."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from django_celery_adv import conf, failures


class Command(BaseCommand):
    help = ("Delete per-day task-failure counts older than the retention period, and the "
            "failure groups not seen for as long (CELERY_ADV['FAILURE_RETENTION_DAYS']).")

    def add_arguments(self, parser):
        parser.add_argument("--days", type=int, default=None,
                            help="Retention in days (default: FAILURE_RETENTION_DAYS, "
                                 f"{conf.DEFAULTS['FAILURE_RETENTION_DAYS']} unless set).")
        parser.add_argument("--dry-run", action="store_true",
                            help="Only count what would be deleted.")

    def handle(self, *args, days: int | None, dry_run: bool, **options) -> None:
        try:
            result = failures.prune(days, dry_run=dry_run)
        except ValueError as e:
            raise CommandError(str(e)) from e
        days = conf.get("FAILURE_RETENTION_DAYS") if days is None else days
        verb = "Would delete" if dry_run else "Deleted"
        self.stdout.write(self.style.SUCCESS(
            f"{verb} {result.groups} failure group(s) and {result.days} per-day count(s) "
            f"older than {days} day(s)."))
