"""Operator actions on recorded tasks: retry with the same arguments, revoke, terminate.

Each goes through the task's own app (``registry.apps[record.app_alias]``), so
with several apps the message reaches the right broker. Permissions and the
admin log are the admin's business (:mod:`django_celery_adv.admin.tasks`).

Guarantees: a broker that is down or refuses the connection gives a
:class:`TaskActionError` with a readable, masked message within a few seconds
(one connection attempt, no publish retries), never a hang or a traceback.
A task whose stored arguments are not exactly its arguments (masked, cut, or
not Python literals: ``TaskRecord.retryable``) is not retried.
"""

from __future__ import annotations

import ast
from typing import Any

from django.utils.translation import gettext as _

from ..exceptions import CeleryAdvError
from ..masking import mask_text, url_secrets
from ..models import TaskRecord
from ..registry import apps


class TaskActionError(CeleryAdvError):
    """An action could not be done; the message is readable and masked."""


def _arguments(record: TaskRecord) -> tuple[list[Any], dict[str, Any]]:
    if not record.retryable or not record.name:
        raise TaskActionError(_("Task %(id)s cannot be retried: its arguments were not "
                                "recorded exactly (masked, shortened or not literals).")
                              % {"id": record.task_id})
    try:
        args = ast.literal_eval(record.args) if record.args else ()
        kwargs = ast.literal_eval(record.kwargs) if record.kwargs else {}
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise TaskActionError(_("Task %(id)s cannot be retried: its recorded arguments are "
                                "not Python literals.") % {"id": record.task_id}) from e
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        raise TaskActionError(_("Task %(id)s cannot be retried: its arguments are not a "
                                "list and a dict.") % {"id": record.task_id})
    if _shortened(record.args, args) or _shortened(record.kwargs, kwargs):
        raise TaskActionError(_("Task %(id)s cannot be retried: its arguments were not "
                                "recorded exactly (masked, shortened or not literals).")
                              % {"id": record.task_id})
    return list(args), kwargs


def _shortened(text: str, value: Any) -> bool:
    """Whether Celery's ``saferepr`` shortened the repr the event carried.

    Events carry ``argsrepr``/``kwargsrepr``, cut by Celery at
    ``AMQP.argsrepr_maxsize`` characters (a long string ends in ``...'``) and
    three levels deep (``[[[...]]]``): both still parse as literals, with other
    values (a cut string, ``Ellipsis``). A repr that long is refused (a real one
    of that length cannot be told apart), and so is any ``Ellipsis``.
    """
    from celery.app.amqp import AMQP

    if len(text or "") >= min(AMQP.argsrepr_maxsize, AMQP.kwargsrepr_maxsize):
        return True
    stack = [value]
    while stack:
        item = stack.pop()
        if item is Ellipsis:
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
    return False


def _app(record: TaskRecord):
    try:
        return apps[record.app_alias]
    except KeyError as e:
        raise TaskActionError(_("App %(alias)s is not configured any more.")
                              % {"alias": record.app_alias}) from e


def _broker_error(app, error: BaseException) -> TaskActionError:
    text = mask_text(f"{type(error).__name__}: {error}", url_secrets(app.conf.broker_url),
                     limit=300)
    return TaskActionError(_("The broker of app %(alias)s is unavailable: %(error)s")
                           % {"alias": app.alias, "error": text})


def retry(record: TaskRecord) -> str:
    """Send the task again with its recorded arguments; the new task's id."""
    args, kwargs = _arguments(record)
    app = _app(record)
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
            result = app.send_task(record.name, args=args, kwargs=kwargs,
                                   connection=connection, retry=False)
    except Exception as error:  # any broker/transport failure
        raise _broker_error(app, error) from error
    return result.id


def revoke(record: TaskRecord, *, terminate: bool = False, signal: str = "SIGTERM") -> None:
    """Revoke the task on every worker of its app; ``terminate`` also kills it if running."""
    app = _app(record)
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
            app.control.revoke(record.task_id, terminate=terminate, signal=signal,
                               connection=connection)
    except Exception as error:
        raise _broker_error(app, error) from error
