"""``manage.py celery_events [--app ALIAS ...] [--prune] [--no-enable-events]``.

Runs the event recorder (:mod:`django_celery_adv.events.recorder`) for every
app of ``CELERY_ADV["APPS"]`` in one process (threads per app), or for the
aliases named with ``--app``. SIGTERM and SIGINT stop it cleanly: the
consumers end and the pending batch is written before exit (status 0).
``--prune`` applies the retention settings once and exits instead (the
running recorder also prunes every ``PRUNE_INTERVAL`` seconds).

Exit status: 0 after a clean stop or prune; 2 for an unknown alias.
"""

from __future__ import annotations

import logging
import signal
import threading

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from django_celery_adv import conf, events
from django_celery_adv.events.recorder import Recorder


class Command(BaseCommand):
    help = gettext_lazy("Record every app's Celery task events into the database (task "
                        "history for the admin Tasks page); --prune applies the retention "
                        "settings and exits.")

    def add_arguments(self, parser):
        parser.add_argument("--app", action="append", dest="aliases", metavar="ALIAS",
                            help=_("Record only this app (repeatable). Default: every app."))
        parser.add_argument("--prune", action="store_true",
                            help=_("Delete records beyond CELERY_ADV['EVENTS'] retention, "
                                   "exit."))
        parser.add_argument("--no-enable-events", action="store_true",
                            help=_("Do not broadcast enable_events to the workers."))

    def handle(self, *args, aliases: list[str] | None, prune: bool, no_enable_events: bool,
               **options) -> None:
        configured = list(conf.app_settings())
        unknown = sorted(set(aliases or ()) - set(configured))
        if unknown:
            raise CommandError(f"unknown app alias(es): {', '.join(unknown)} "
                               f"(configured: {', '.join(configured) or 'none'})", returncode=2)
        aliases = aliases or configured
        if prune:
            try:
                results = events.prune_apps(aliases)
            except DatabaseError as e:
                raise CommandError(f"database unavailable: {e}") from e
            for alias, result in results.items():
                self.stdout.write(f"{alias}: deleted {result.by_age} record(s) by age, "
                                  f"{result.by_count} by count")
            return
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO,
                                format="[%(asctime)s: %(levelname)s] %(message)s")
        stop = threading.Event()

        def on_signal(signum, frame):
            self.stdout.write(f"celery_events: {signal.Signals(signum).name}, "
                              "writing the last batch and stopping")
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        recorder = Recorder(aliases, events.settings_for, enable_events=not no_enable_events)
        self.stdout.write(f"celery_events: recording {', '.join(aliases)}")
        self.stdout.flush()
        recorder.run_until(stop)
        self.stdout.write(self.style.SUCCESS("celery_events: stopped"))
