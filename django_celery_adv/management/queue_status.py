"""``celery_status queues``: message counts per queue, as text or JSON.

The command reads the workers (:func:`~django_celery_adv.monitoring.inspect_all`)
and hands that reading to :func:`~django_celery_adv.queues.read_queues`, so the
queues the workers consume are counted without a second broadcast; this module
only renders the result. "?" means not known (never 0).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from django.utils.translation import gettext, gettext_noop

from ..queues import AppQueues

UNKNOWN = "?"
#: The table's header (translated when printed).
COLUMNS = (gettext_noop("queue"), gettext_noop("ready"), gettext_noop("unacked"),
           gettext_noop("consumers"), gettext_noop("workers"))


def _cell(value: Any) -> str:
    return UNKNOWN if value is None else str(value)


def queue_rows(reading: AppQueues) -> list[tuple[str, ...]]:
    """The table rows of one app, header first."""
    rows = [tuple(gettext(column) for column in COLUMNS)]
    for queue in reading.queues:
        ready = gettext("no such queue") if queue.exists is False else _cell(queue.ready)
        rows.append((queue.name, ready, _cell(queue.unacked), _cell(queue.consumers),
                     ",".join(queue.workers) or "-"))
    return rows


def write_queues(command: BaseCommand, reading: AppQueues) -> None:
    """Print one app's queue table (or why there are no counts) on the command's stdout."""
    out, style = command.stdout, command.style
    if reading.error:
        out.write(style.ERROR(f"Queues: {UNKNOWN} ({reading.error})"))
    elif not reading.supported:
        out.write(style.WARNING(f"Queues: message counts are not supported on the "
                                f"{reading.transport} transport"))
    rows = queue_rows(reading)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for index, row in enumerate(rows):
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths,
                                                                   strict=True)).rstrip()
        out.write(style.MIGRATE_LABEL(line) if index == 0 else line)
    if reading.unacked is not None:
        out.write(f"unacked in this Redis database (all queues): {reading.unacked}")
    out.write("")


def queues_json(reading: AppQueues) -> dict[str, Any]:
    """One app's counts for ``--json`` (the app and broker are already there)."""
    data = reading.as_dict()
    for key in ("alias", "broker"):
        data.pop(key, None)
    return data
