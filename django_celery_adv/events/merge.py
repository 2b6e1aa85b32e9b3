"""Task events -> the fields of a :class:`~django_celery_adv.models.TaskRecord`.

Pure functions, no I/O: the recorder folds each event into a *change* (a dict
of record fields) and the store folds a change into the stored row with the
same rule, so the outcome does not depend on how events were batched.

Merge rule (Celery's own, ``celery.events.state.Task.event``, by its state
precedence ``celery.states.precedence``): an event whose state logically
happens *before* the current one (``STARTED`` after ``SUCCESS``, ``RECEIVED``
after ``STARTED``) does not change the state and only fills fields that are
still empty; any other event sets the state and overwrites the fields it
carries. Where ``RETRY`` is involved precedence says nothing, so the newer
event timestamp wins (a retried task runs again under the same id).

Guarantees: a late ``task-started`` never overwrites ``succeeded``; arguments,
results, exceptions and tracebacks are masked (:mod:`django_celery_adv.masking`)
and shortened here, before anything is kept in memory or stored.
"""

from __future__ import annotations

from typing import Any

from celery import states

from ..masking import mask_text

MAX_ARGS_CHARS = 2000
MAX_RESULT_CHARS = 1000
MAX_EXCEPTION_CHARS = 4000
MAX_TRACEBACK_CHARS = 20000

#: Celery task event type -> the state it means (``task-sent`` is the client's).
EVENT_STATES = {
    "task-sent": states.PENDING,
    "task-received": states.RECEIVED,
    "task-started": states.STARTED,
    "task-succeeded": states.SUCCESS,
    "task-failed": states.FAILURE,
    "task-retried": states.RETRY,
    "task-revoked": states.REVOKED,
    "task-rejected": states.REJECTED,
}
#: Event type -> the record field holding its time.
EVENT_TIME_FIELDS = {
    "task-received": "received_at",
    "task-started": "started_at",
    "task-succeeded": "succeeded_at",
    "task-failed": "failed_at",
}
#: Fields whose value is text ("" = unknown), the rest are numbers/None.
TEXT_FIELDS = ("name", "worker", "args", "kwargs", "result", "exception", "traceback",
               "parent_id", "root_id")
#: Fields a change may carry besides ``state`` and ``state_timestamp``.
RECORD_FIELDS = (*TEXT_FIELDS, "retryable", "received_at", "started_at", "succeeded_at",
                 "failed_at", "runtime", "retries")


def _keep_end(text: str, limit: int) -> str:
    # The whole text was masked first: the end of a traceback is what matters.
    return text if len(text) <= limit else "...\n" + text[-(limit - 4):]


def _arguments(value: Any) -> tuple[str, bool]:
    """(masked shortened text, whether masking and shortening left it as it was)."""
    if value is None:
        return "", False
    text = value if isinstance(value, str) else repr(value)
    shown = mask_text(text, limit=MAX_ARGS_CHARS)
    return shown, shown == text


def event_fields(event: dict[str, Any]) -> dict[str, Any]:
    """The record fields one task event carries (masked, shortened)."""
    kind = event.get("type", "")
    timestamp = event.get("timestamp")
    fields: dict[str, Any] = {}
    if kind != "task-sent" and event.get("hostname"):
        fields["worker"] = str(event["hostname"])[:255]
    if kind in EVENT_TIME_FIELDS and timestamp:
        fields[EVENT_TIME_FIELDS[kind]] = float(timestamp)
    if kind in ("task-received", "task-sent"):
        fields["name"] = str(event.get("name") or "")[:255]
        args, args_ok = _arguments(event.get("args"))
        kwargs, kwargs_ok = _arguments(event.get("kwargs"))
        fields.update(args=args, kwargs=kwargs, retryable=args_ok and kwargs_ok)
        for key in ("parent_id", "root_id"):
            if event.get(key):
                fields[key] = str(event[key])[:255]
        if event.get("retries"):
            fields["retries"] = int(event["retries"])
    elif kind == "task-succeeded":
        if event.get("result") is not None:
            fields["result"] = mask_text(str(event["result"]), limit=MAX_RESULT_CHARS)
        if event.get("runtime") is not None:
            fields["runtime"] = float(event["runtime"])
    elif kind in ("task-failed", "task-retried"):
        if event.get("exception"):
            fields["exception"] = mask_text(str(event["exception"]), limit=MAX_EXCEPTION_CHARS)
        if event.get("traceback"):
            fields["traceback"] = _keep_end(mask_text(str(event["traceback"])),
                                            MAX_TRACEBACK_CHARS)
    return fields


def _state_wins(new: str, new_ts: float, current: str | None, current_ts: float) -> bool:
    if current is None:
        return True
    if new == states.RETRY or current == states.RETRY:
        return new_ts >= current_ts
    # precedence: a lower index is a later state; a higher one happened before.
    return states.precedence(new) <= states.precedence(current)


def merge(target: dict[str, Any], state: str | None, timestamp: float,
          fields: dict[str, Any]) -> dict[str, Any]:
    """Fold ``fields`` (from an event, or a whole change) with ``state`` into ``target``.

    ``target`` holds ``state``, ``state_timestamp`` and record fields; it is
    changed in place and returned. Numbers: ``retries`` keeps the maximum.
    """
    wins = state is not None and _state_wins(state, timestamp, target.get("state"),
                                             target.get("state_timestamp") or 0.0)
    if wins:
        target["state"] = state
        target["state_timestamp"] = timestamp
    for key, value in fields.items():
        if key == "retries":
            target[key] = max(target.get(key) or 0, value or 0)
        elif value in (None, ""):
            continue
        elif wins or target.get(key) in (None, ""):
            if key == "retryable" and not wins and target.get("args"):
                continue  # belongs to the arguments already there
            target[key] = value
    return target


def apply_event(change: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """Fold one task event into a change (a dict as :func:`merge` keeps it)."""
    state = EVENT_STATES.get(event.get("type", ""))
    return merge(change, state, float(event.get("timestamp") or 0.0), event_fields(event))


def derive(record: dict[str, Any]) -> dict[str, Any]:
    """Fill ``runtime`` (failed - started) and ``queue_wait`` (started - received)."""
    started, received = record.get("started_at"), record.get("received_at")
    if record.get("runtime") is None and started and record.get("failed_at") \
            and record.get("state") == states.FAILURE:
        record["runtime"] = max(0.0, record["failed_at"] - started)
    if started and received:
        record["queue_wait"] = max(0.0, started - received)
    return record
