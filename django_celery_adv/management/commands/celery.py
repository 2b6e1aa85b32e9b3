"""``manage.py celery <alias> <celery arguments>``: Celery's CLI for one app.

Everything after the alias goes to Celery untouched (``worker -l info``,
``beat``, ``inspect ping``, ``events`` ...), so the command reads like
``celery -A proj ...`` with the app picked from ``CELERY_ADV["APPS"]``.
"""

from __future__ import annotations

import os
import sys

from django.core.management.base import BaseCommand, CommandError
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from django_celery_adv import cli
from django_celery_adv.registry import apps


class Command(BaseCommand):
    help = gettext_lazy("Run Celery's command line for one app of CELERY_ADV['APPS'].")

    def run_from_argv(self, argv: list[str]) -> None:
        # Django's option parser would claim Celery's options (-l, -c, -A ...);
        # everything after the alias is passed to Celery verbatim instead.
        prog = f"{os.path.basename(argv[0])} {argv[1]}"
        rest = argv[2:]
        if not rest or rest[0] in ("-h", "--help"):
            self.stdout.write(self.usage(prog))
            sys.exit(0 if rest else 2)
        alias, celery_args = rest[0], rest[1:]
        try:
            self.execute_celery(alias, celery_args, prog)
        except CommandError as e:
            self.stderr.write(self.style.ERROR(f"CommandError: {e}"))
            sys.exit(e.returncode)

    def usage(self, prog: str) -> str:
        aliases = ", ".join(apps) or _("none configured")
        return _(
            "usage: %(prog)s <alias> <celery command> [options]\n"
            "  aliases: %(aliases)s\n"
            "  e.g.: %(prog)s default worker -l info\n"
        ) % {"prog": prog, "aliases": aliases}

    def execute_celery(self, alias: str, celery_args: list[str], prog: str) -> None:
        if alias not in apps:
            raise CommandError(
                _("unknown app %(alias)s; CELERY_ADV['APPS'] has: %(aliases)s")
                % {"alias": repr(alias), "aliases": ", ".join(apps) or _("none")},
                returncode=2,
            )
        from celery.bin.celery import celery as celery_cli

        os.environ[cli.ALIAS_ENV] = alias
        apps[alias]  # build it here so a configuration error is reported as ours
        celery_cli.main(
            args=["-A", "django_celery_adv.cli:app", *celery_args],
            prog_name=f"{prog} {alias}",
            auto_envvar_prefix="CELERY",
        )

    def handle(self, *args: str, **options: object) -> None:  # pragma: no cover
        raise CommandError(_("run through manage.py: call_command cannot pass Celery's "
                             "options"))
