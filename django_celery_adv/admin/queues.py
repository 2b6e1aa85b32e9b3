"""Admin Queues page (messages per queue of every app) and purging a queue.

Views of the Monitoring admin (:mod:`.monitoring` adds :meth:`QueuePages.urls`
to its URLs), so Django's admin guards them the same way:

* ``admin_site.admin_view``: anonymous and non-staff users go to the login
  page; CSRF protection; ``never_cache``;
* every page needs ``django_celery_adv.view_monitoring`` (else 403);
* purging needs ``django_celery_adv.purge_queue`` as well (else 403): a GET
  shows a confirmation naming the queue, its app and the messages ready now;
  only a POST (with the CSRF token) purges, and each purge is one admin-log
  entry (:mod:`.oplog`) saying how many messages went, or the broker's error
  (a purge that timed out may still have happened).

Counts come from :mod:`django_celery_adv.queues`; which queues the workers
consume, from :func:`django_celery_adv.monitoring.inspect_all` (the shared
reading). A broker that is down shows its error in place; the page renders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path
from django.utils.http import urlencode
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from ..exceptions import BrokerError
from ..monitoring import inspect_all
from ..queues import known_queues, purge_queue, read_app, read_queues
from ..registry import apps
from .oplog import log_operator_action

if TYPE_CHECKING:
    from .monitoring import MonitoringAdmin

PURGE_PERMISSION = "django_celery_adv.purge_queue"


class QueuePages:
    """The queues page and the purge confirmation, served by ``model_admin``."""

    queues_template = "admin/django_celery_adv/monitoring/queues.html"
    purge_template = "admin/django_celery_adv/monitoring/purge_confirm.html"
    title = gettext_lazy("Celery queues")

    def __init__(self, model_admin: MonitoringAdmin) -> None:
        self.model_admin = model_admin

    def urls(self) -> list:
        name, wrap = self.model_admin.url_name, self.model_admin.admin_site.admin_view
        return [
            path("queues/", wrap(self.queues_view), name=name("queues")),
            path("queues/purge/", wrap(self.purge_view), name=name("purge_queue")),
        ]

    @staticmethod
    def can_purge(request: HttpRequest) -> bool:
        return request.user.has_perm(PURGE_PERMISSION)

    def queues_view(self, request: HttpRequest) -> HttpResponse:
        """Every app's queues with ready (and where known unacked, consumers) counts."""
        self.model_admin._require_view(request)
        readings = read_queues(statuses=inspect_all())
        context = self.model_admin._context(
            request, self.title, readings=list(readings.values()),
            can_purge=self.can_purge(request),
            purge_url=self.model_admin._url("purge_queue"))
        return TemplateResponse(request, self.queues_template, context)

    def purge_view(self, request: HttpRequest) -> HttpResponse:
        """GET: confirmation naming the count; POST: purge, log, back to the queues page."""
        self.model_admin._require_view(request)
        if not self.can_purge(request):
            raise PermissionDenied
        data = request.POST if request.method == "POST" else request.GET
        alias, queue = data.get("app", ""), data.get("queue", "")
        # Only a queue of the app: kombu's purge deletes whatever keys the name maps to.
        if alias not in apps or queue not in known_queues(alias, inspect_all([alias])[alias]):
            raise Http404(_("No such app or queue."))
        back = HttpResponseRedirect(self.model_admin._url("queues"))
        if request.method == "POST":
            try:
                purged = purge_queue(alias, queue)
            except BrokerError as e:
                # Logged too: a purge that timed out may still have deleted messages.
                log_operator_action(request.user, alias, f"queue:{queue}",
                                    f"queue {queue} ({alias})",
                                    f"Purge of queue {queue} failed: {e}")
                messages.error(request, _("Queue %(queue)s of %(app)s was not purged: "
                                          "%(error)s") % {"queue": queue, "app": alias,
                                                          "error": e})
                return back
            log_operator_action(request.user, alias, f"queue:{queue}",
                                f"queue {queue} ({alias})",
                                f"Purged queue {queue}: {purged} messages deleted")
            messages.success(request, _("Purged queue %(queue)s of %(app)s: %(count)d "
                                        "messages deleted.") % {"queue": queue, "app": alias,
                                                                "count": purged})
            return back
        reading = read_app(alias, extra=[queue])
        depth = reading.queue(queue)
        if not reading.readable or depth is None or depth.exists is False:
            problem = reading.error or (
                _("counts are not supported on the %(transport)s transport")
                % {"transport": reading.transport} if not reading.supported
                else _("no such queue on the broker"))
            messages.error(request, _("Queue %(queue)s of %(app)s cannot be purged: "
                                      "%(error)s") % {"queue": queue, "app": alias,
                                                      "error": problem})
            return back
        context = self.model_admin._context(
            request, _("Purge queue %(queue)s?") % {"queue": queue}, alias=alias,
            queue=depth, reading=reading, queues_url=self.model_admin._url("queues"),
            purge_url=f"{self.model_admin._url('purge_queue')}?"
                      f"{urlencode({'app': alias, 'queue': queue})}")
        return TemplateResponse(request, self.purge_template, context)

