"""``manage.py celery_status [ping|active|stats|queues|beat]``: every app's workers at once.

Reads all apps of ``CELERY_ADV["APPS"]`` (or those named with ``--app``)
concurrently through :func:`django_celery_adv.monitoring.inspect_all`. The
default output reads like ``celery inspect ping``, grouped by app, followed by
one workers table; ``--json`` prints the readings instead.

``beat`` prints each app's beat health instead (leader, standbys, last tick:
:func:`django_celery_adv.beat.health.app_health`, read from the database, no
broker asked); ``--require-beat`` adds it to any other reading and to the exit
status.

The reading is the shared one (:func:`~django_celery_adv.monitoring.inspect_all`):
one younger than ``MONITORING["READING_MAX_AGE"]`` taken by another process
or page is reused (``--fresh`` broadcasts anyway). Liveness comes from
``stats``; no separate ``ping`` round is sent, and running tasks are asked
for only by ``active``. In the text output ``?`` is a field the worker did
not send, ``unread`` one whose reply was not read, ``-`` one this reading did
not ask for; a silent worker shows its last known values with their age.

Exit status, so it serves as a container health check: 0 when every app's
broker answered, at least one of its workers is online or silent but seen
within ``MONITORING["SILENT_WINDOW"]`` seconds (a busy prefork worker stops
answering inspect), and the reading is complete -- a ``partial`` reading
(replies asked for and not read, other than those of such silent workers) is
unhealthy unless ``--allow-partial`` (``beat``: when each
app has a beat leader whose last tick is at most 3 max intervals old; both with
``--require-beat``), 1 otherwise, 2 for a configuration error (an unknown
alias, a system-check error, a bad option). Broker passwords never appear in
the output.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import (
    BaseCommand,
    CommandError,
    CommandParser,
    SystemCheckError,
)
from django.db import DatabaseError
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, gettext_noop

from django_celery_adv import conf
from django_celery_adv.beat.health import AppBeatHealth, app_health
from django_celery_adv.exceptions import CeleryAdvError
from django_celery_adv.management.queue_status import queues_json, write_queues
from django_celery_adv.monitoring import FULL_COMMANDS, AppStatus, WorkerStatus, inspect_all
from django_celery_adv.queues import read_queues
from django_celery_adv.registry import apps

UNKNOWN = "?"
#: A field whose reply was not read in this reading (not the same as "not sent": ``?``).
NOT_READ = "unread"
#: A field no command of this reading fills (``running`` unless ``active`` was asked).
NOT_ASKED = "-"
#: Header of the workers table (translated when printed; the rows stay as read).
TABLE_COLUMNS = (gettext_noop("app"), gettext_noop("worker"), gettext_noop("status"),
                 gettext_noop("age"), gettext_noop("concurrency"), gettext_noop("processed"),
                 gettext_noop("running"), gettext_noop("queues"))


def _value(value: Any) -> str:
    return UNKNOWN if value is None else str(value)


def _field(worker: WorkerStatus, name: str, text: str | None = None,
           commands: list[str] | None = None) -> str:
    """A worker's field: its value; ``unread`` if its reply was not read; ``-`` if this
    reading did not ask for it (``commands``); else ``?`` (the worker did not send it)."""
    value = getattr(worker, name)
    if value is not None:
        return str(value) if text is None else text
    if worker.not_read(name):
        return NOT_READ
    if commands is not None and worker.not_asked(name, commands):
        return NOT_ASKED
    return UNKNOWN


def _age(worker: WorkerStatus, status: AppStatus) -> str:
    """How old the shown values are: ``now`` when read in this reading."""
    if worker.values_at is None:
        return "-"
    if worker.values_at == status.read_at:
        return "now"
    return f"{_duration(worker.values_age(status.read_at))} ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return UNKNOWN
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")]
    shown = [f"{n}{unit}" for n, unit in parts if n][:2]
    return " ".join(shown) or "0s"


class Command(BaseCommand):
    help = gettext_lazy("Status of the workers of every Celery app: ping, active tasks, stats "
                        "or queues, then a workers table. Exit 0 healthy, 1 unhealthy, "
                        "2 misconfigured.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("what", nargs="?", default="ping",
                            choices=["ping", "active", "stats", "queues", "beat"],
                            help=_("What to print per worker before the table (default: "
                                   "ping); beat: only the beat health of each app."))
        parser.add_argument("--app", action="append", dest="aliases", metavar="ALIAS",
                            help=_("Only this app (repeat for several); default: all apps."))
        parser.add_argument("--timeout", type=float, default=None, metavar="S",
                            help=_("Seconds to wait for replies (default: INSPECT_TIMEOUT)."))
        parser.add_argument("--json", action="store_true", dest="as_json",
                            help=_("Print the readings as JSON."))
        parser.add_argument("--allow-partial", action="store_true",
                            help=_("A partial reading (replies not read in time) is still "
                                   "healthy for the exit status."))
        parser.add_argument("--fresh", action="store_true",
                            help=_("Broadcast now instead of reusing a reading younger than "
                                   "MONITORING['READING_MAX_AGE']."))
        parser.add_argument("--require-beat", action="store_true",
                            help=_("Also read beat health; exit 1 when an app has no beat "
                                   "leader or its last tick is older than 3 max intervals."))

    def check(self, *args: Any, **kwargs: Any) -> None:
        # A system-check error is a configuration error: exit 2, not Django's 1,
        # so a health check can tell "misconfigured" from "unhealthy".
        try:
            super().check(*args, **kwargs)
        except SystemCheckError as e:
            raise CommandError(str(e), returncode=2) from e

    def handle(self, *args: Any, what: str, aliases: list[str] | None,
               timeout: float | None, as_json: bool, require_beat: bool = False,
               allow_partial: bool = False, fresh: bool = False, **options: Any) -> None:
        if timeout is not None and not timeout > 0:
            raise CommandError("--timeout must be a positive number of seconds", returncode=2)
        unknown = [alias for alias in aliases or [] if alias not in apps]
        if unknown:
            raise CommandError(
                f"unknown app {', '.join(map(repr, unknown))}; CELERY_ADV['APPS'] has: "
                f"{', '.join(apps) or 'none'}", returncode=2)
        if what == "beat":
            self.handle_beat(aliases or list(apps), as_json)
            return
        try:
            # "active" lists every worker's running tasks: a reading with them.
            statuses = inspect_all(aliases, timeout=timeout, max_age=0 if fresh else None,
                                   commands=FULL_COMMANDS if what == "active" else None)
        except CeleryAdvError as e:  # an app whose settings cannot be built
            raise CommandError(str(e), returncode=2) from e
        beats = self.read_beats(list(statuses)) if require_beat else {}
        window = float(conf.monitoring("SILENT_WINDOW"))
        problems = {alias: status.problem(allow_partial=allow_partial, window=window)
                    for alias, status in statuses.items()}
        # Message counts per queue; the reading above says what workers consume.
        depths = (read_queues(statuses, statuses=statuses, timeout=timeout)
                  if what == "queues" else {})

        if as_json:
            data = {alias: {**status.as_dict(), "problem": problems[alias]}
                    for alias, status in statuses.items()}
            for alias, health in beats.items():
                data[alias]["beat"] = health.as_dict()
            for alias, reading in depths.items():
                data[alias]["queues"] = queues_json(reading)
            self.stdout.write(json.dumps(data, indent=2))
        else:
            for status in statuses.values():
                self.write_app(status, what)
                if status.alias in depths:
                    write_queues(self, depths[status.alias])
            self.write_table(statuses.values())
            for health in beats.values():
                self.write_beat(health)

        unhealthy = [f"{alias} ({problem})" for alias, problem in problems.items() if problem]
        unhealthy += [f"{health.alias} ({health.problem})" for health in beats.values()
                      if not health.healthy]
        if unhealthy:
            raise CommandError(f"unhealthy: {', '.join(unhealthy)}", returncode=1)

    def read_beats(self, aliases: list[str]) -> dict[str, AppBeatHealth]:
        try:
            return app_health(aliases)
        except DatabaseError as e:  # health rows live in the database
            raise CommandError(f"cannot read beat health: {e}", returncode=1) from e

    def handle_beat(self, aliases: list[str], as_json: bool) -> None:
        beats = self.read_beats(aliases)
        if as_json:
            self.stdout.write(json.dumps(
                {alias: {"beat": health.as_dict()} for alias, health in beats.items()},
                indent=2))
        else:
            for health in beats.values():
                self.write_beat(health)
        unhealthy = [f"{health.alias} ({health.problem})" for health in beats.values()
                     if not health.healthy]
        if unhealthy:
            raise CommandError(f"unhealthy: {', '.join(unhealthy)}", returncode=1)

    # -- text output ---------------------------------------------------------------

    def write_beat(self, health: AppBeatHealth) -> None:
        self.stdout.write(self.style.MIGRATE_HEADING(f"{health.alias}: beat"))
        leader = health.leader
        if leader is None:
            self.stdout.write(self.style.ERROR("-> no leader"))
        else:
            since = leader.leader_since.strftime("%Y-%m-%d %H:%M:%S UTC") \
                if leader.leader_since else UNKNOWN
            line = (f"-> leader {leader.hostname} pid {leader.pid}: token {leader.token}, "
                    f"since {since}, last tick {leader.age:.1f} s ago "
                    f"(lag {leader.tick_lag:.2f} s), sent {leader.sent}")
            self.stdout.write(self.style.ERROR(line) if leader.stale
                              else self.style.SUCCESS(line))
            if leader.next_due_name:
                due = leader.next_due_at.strftime("%H:%M:%S UTC") if leader.next_due_at \
                    else UNKNOWN
                self.stdout.write(f"   next due: {leader.next_due_name} at {due}")
        for standby in health.standbys:
            self.stdout.write(f"-> standby {standby.hostname} pid {standby.pid}: "
                              f"last tick {standby.age:.1f} s ago")
        for gone in health.gone:
            self.stdout.write(self.style.WARNING(
                f"-> gone {gone.hostname} pid {gone.pid} ({gone.role}): "
                f"last tick {gone.age:.0f} s ago"))
        if health.problem:
            self.stdout.write(self.style.ERROR(f"Error: {health.problem}"))
        self.stdout.write("")

    def write_app(self, status: AppStatus, what: str) -> None:
        self.stdout.write(self.style.MIGRATE_HEADING(
            f"{status.alias}: {status.broker} (read in {status.duration * 1000:.0f} ms)"))
        if not status.reachable:
            self.stdout.write(self.style.ERROR(f"Error: {status.error}"))
        if status.shared:
            self.stdout.write(f"(reading shared: taken {status.duration * 1000:.0f} ms long, "
                              f"{_duration((timezone.now() - status.read_at).total_seconds())}"
                              " ago by another view or process)")
        if status.partial:
            self.stdout.write(self.style.WARNING(
                f"PARTIAL: {status.unread} repl{'y' if status.unread == 1 else 'ies'} not read "
                f"in time; {status.missing} expected worker"
                f"{'' if status.missing == 1 else 's'} sent nothing."))
        for worker in status.workers:
            self.write_worker(worker, what, status)
        online = len(status.online)
        self.stdout.write(f"{online} node{'' if online == 1 else 's'} online.")
        self.stdout.write("")

    def write_worker(self, worker: WorkerStatus, what: str, status: AppStatus) -> None:
        if not worker.online:
            seen = worker.last_seen.strftime("%Y-%m-%d %H:%M:%S UTC") if worker.last_seen \
                else UNKNOWN
            values = "" if worker.values_at is None else \
                f", last values {_age(worker, status)}"
            self.stdout.write(self.style.WARNING(
                f"-> {worker.name}: {worker.status} (last seen {seen}{values})"))
            return
        if worker.unread:
            self.stdout.write(f"-> {worker.name}: " + self.style.WARNING(
                f"OK, replies not read: {', '.join(worker.unread)}"))
        if what == "ping":
            if not worker.unread:
                self.stdout.write(f"-> {worker.name}: " + self.style.SUCCESS(
                    f"OK {worker.ping}" if worker.ping else "OK"))
            return
        if not worker.unread:
            self.stdout.write(f"-> {worker.name}: " + self.style.SUCCESS("OK"))
        if what == "active":
            if worker.active is None:
                self.stdout.write(f"    {_field(worker, 'active')} (no reply to active)")
            elif not worker.active:
                self.stdout.write("    - empty -")
            for task in worker.active or []:
                runtime = UNKNOWN if task.runtime is None else f"{task.runtime:.1f} s"
                self.stdout.write(
                    f"    * {task.name}[{task.id}] args={task.args} kwargs={task.kwargs} "
                    f"pid={_value(task.worker_pid)} runtime={runtime}")
        elif what == "stats":
            for name in ("pool", "concurrency", "processed", "prefetch", "pid"):
                self.stdout.write(f"    {name}: {_field(worker, name, None, status.commands)}")
            self.stdout.write(f"    uptime: {_field(worker, 'uptime', _duration(worker.uptime))}")
        elif what == "queues":
            if worker.queues is None:
                self.stdout.write(f"    {_field(worker, 'queues')} (no reply to active_queues)")
            for queue in worker.queues or []:
                self.stdout.write(f"    * {queue}")

    def write_table(self, statuses: Any) -> None:
        rows = [tuple(_(column) for column in TABLE_COLUMNS)]
        for status in statuses:
            for worker in status.workers:
                rows.append((status.alias, worker.name, str(worker.status),
                             _age(worker, status), _field(worker, "concurrency"),
                             _field(worker, "processed"),
                             _field(worker, "running", None, status.commands),
                             _field(worker, "queues", ",".join(worker.queues or ()))))
        if len(rows) == 1:
            self.stdout.write(_("No workers."))
            return
        widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
        for index, row in enumerate(rows):
            line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths,
                                                                       strict=True)).rstrip()
            self.stdout.write(self.style.MIGRATE_LABEL(line) if index == 0 else line)
