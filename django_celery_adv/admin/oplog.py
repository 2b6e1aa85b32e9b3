"""The admin-log entry of an operator action on a queue or a worker.

Queues and workers are no database rows, so each action is one ``LogEntry``
(``CHANGE``) on the content type of the table-less
:class:`~django_celery_adv.models.Monitoring` model, with
``object_id`` ``"<alias>/<queue or worker>"``: the admin's "Recent actions"
and any ``LogEntry`` query find it by user, time and object.
"""

from __future__ import annotations

from typing import Any

from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.contenttypes.models import ContentType

from ..models import Monitoring

#: ``LogEntry.object_repr`` is a CharField of this length.
REPR_LIMIT = 200


def log_operator_action(user: Any, alias: str, target: str, object_repr: str,
                        message: str) -> LogEntry:
    """Record ``message`` (what was done and its outcome) by ``user`` on ``target``."""
    return LogEntry.objects.create(
        user_id=user.pk, content_type=ContentType.objects.get_for_model(Monitoring),
        object_id=f"{alias}/{target}", object_repr=object_repr[:REPR_LIMIT],
        action_flag=CHANGE, change_message=message)
