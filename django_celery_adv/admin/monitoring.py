"""Admin pages for monitoring: workers of every app, one worker, lock holders.

Registered on the default admin site as the admin of the table-less
:class:`~django_celery_adv.models.Monitoring` model, so the admin index lists
"Celery monitoring" under the app and Django's own machinery guards the pages:

* ``admin_site.admin_view`` sends anonymous and non-staff users to the login
  page, adds CSRF protection and ``never_cache``;
* every page needs ``django_celery_adv.view_monitoring`` (else 403);
* force-releasing a lock is a POST with a CSRF token and needs
  ``django_celery_adv.force_release_lock`` as well; it goes through
  ``locks.force_release``, which logs it as one ``LogEntry`` on the lock
  definition, like the lock admin's action.

Pages read through :mod:`django_celery_adv.monitoring` and
:mod:`django_celery_adv.locks` (``holders``, ``force_release``), never a
broker or lock server directly. A broker or lock backend that is down shows
its error in place (a message after a force release) and the page still
renders; a lock backend that failed is not asked again in the same request.

The workers page serves the shared reading (:func:`~..monitoring.inspect_all`
reuses one younger than ``MONITORING["READING_MAX_AGE"]``, so N operators
with auto-refresh cause one broadcast, not N): a summary line per app first
(counts per status, complete or partial), then one page of
``MONITORING["PAGE_SIZE"]`` rows, filtered by app, state, queue and host.
Serving a stored reading takes the same SQL queries for 10 or 2,000 workers
(the session, the user, two per app). A worker's page asks that worker alone
for its running tasks; a worker that does not answer (busy, gone) shows its
last known values with their age, never a 404 while it is in the record.
Templates use only the admin's CSS and work without JavaScript;
``?refresh=N`` adds a plain meta refresh every N seconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import DatabaseError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from .. import conf
from ..beat.health import app_health
from ..events import worker_counters_by_app
from ..exceptions import CeleryAdvError
from ..locks import force_release
from ..locks.operations import HolderReader, describe_backend, masked_error
from ..models import LockDefinition, Monitoring
from ..monitoring import FULL_COMMANDS, Status, inspect_all, read_worker
from ..monitoring import table as workers_table
from ..registry import apps
from .queues import QueuePages
from .worker_control import WorkerControlPages

VIEW_PERMISSION = "django_celery_adv.view_monitoring"
FORCE_RELEASE_PERMISSION = "django_celery_adv.force_release_lock"
#: Bounds of ``?refresh=N`` (seconds).
REFRESH_RANGE = (2, 3600)
#: The refresh interval offered by the pages' "auto-refresh" link.
DEFAULT_REFRESH = 10


class HolderRow:
    """One lock definition as the lock holders page shows it."""

    def __init__(self, definition: LockDefinition, backend: str, leases: list,
                 error: str | None) -> None:
        self.definition = definition
        self.backend = backend
        self.leases = leases
        self.error = error


@admin.register(Monitoring)
class MonitoringAdmin(admin.ModelAdmin):
    """The monitoring pages; the model has no table, so none of the CRUD views exist."""

    workers_template = "admin/django_celery_adv/monitoring/workers.html"
    worker_template = "admin/django_celery_adv/monitoring/worker_detail.html"
    locks_template = "admin/django_celery_adv/monitoring/lock_holders.html"

    # -- permissions: view only; add/change/delete make no sense without a table --

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(VIEW_PERMISSION)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_force_release_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(FORCE_RELEASE_PERMISSION)

    def _require_view(self, request: HttpRequest) -> None:
        if not self.has_view_permission(request):
            raise PermissionDenied

    # -- URLs ------------------------------------------------------------------------

    def get_urls(self) -> list:
        # Only our pages: the default change/delete/history views would query
        # a table that does not exist.
        wrap = self.admin_site.admin_view
        return [
            path("", wrap(self.changelist_view), name=self.url_name("changelist")),
            path("workers/<str:alias>/<str:name>/", wrap(self.worker_view),
                 name=self.url_name("worker")),
            path("locks/", wrap(self.locks_view), name=self.url_name("locks")),
            path("locks/force-release/", wrap(self.force_release_view),
                 name=self.url_name("force_release")),
            *QueuePages(self).urls(), *WorkerControlPages(self).urls(),
        ]

    def url_name(self, page: str) -> str:
        """The URL name of one of our pages (``admin:`` + this, to reverse it)."""
        return f"{self.opts.app_label}_{self.opts.model_name}_{page}"

    def _url(self, name: str, *args: Any) -> str:
        return reverse(f"admin:{self.url_name(name)}", args=args,
                       current_app=self.admin_site.name)

    def _context(self, request: HttpRequest, title: str, **extra: Any) -> dict[str, Any]:
        refresh = self._refresh(request)
        request.current_app = self.admin_site.name
        return {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.opts,
            "app_label": self.opts.app_label,
            "refresh": refresh,
            "default_refresh": DEFAULT_REFRESH,
            "workers_url": self._url("changelist"),
            "locks_url": self._url("locks"),
            "queues_url": self._url("queues"),
            "now": timezone.now(),
            **extra,
        }

    @staticmethod
    def _refresh(request: HttpRequest) -> int | None:
        try:
            seconds = int(request.GET.get("refresh", ""))
        except ValueError:
            return None
        return min(max(seconds, REFRESH_RANGE[0]), REFRESH_RANGE[1])

    # -- pages -----------------------------------------------------------------------

    def changelist_view(self, request: HttpRequest,
                        extra_context: dict[str, Any] | None = None) -> HttpResponse:
        """The workers page: a summary per app, then one filtered page of workers."""
        self._require_view(request)
        statuses = list(inspect_all().values())
        filters = workers_table.Filters.from_query(request.GET)
        matching = workers_table.matching(statuses, filters)
        page = Paginator(matching, int(conf.monitoring("PAGE_SIZE"))).get_page(
            request.GET.get("page"))
        now = timezone.now()
        table = {
            "summaries": workers_table.summaries(statuses,
                                                 float(conf.monitoring("SILENT_WINDOW"))),
            "filters": filters, "page": page, "matching": len(matching),
            "rows": workers_table.rows(page.object_list, now,
                                       self._event_counters(s.alias for s in statuses)),
            "columns": [label for _field, label in workers_table.COLUMNS],
            "queue_names": workers_table.queue_names(statuses),
            "state_names": [status.value for status in Status],
            "previous_query": filters.query(page=str(page.number - 1))
            if page.has_previous() else None,
            "next_query": filters.query(page=str(page.number + 1)) if page.has_next() else None,
        }
        try:  # beat health of the apps that run beat (the beat processes page has details)
            beat_summary = [health for health in app_health([s.alias for s in statuses]).values()
                            if health.leader or health.standbys or health.gone]
        except DatabaseError as e:
            beat_summary, beat_error = [], str(e)
        else:
            beat_error = None
        context = self._context(request, _("Celery workers"), statuses=statuses,
                                beat_summary=beat_summary, beat_error=beat_error,
                                **table, **(extra_context or {}))
        return TemplateResponse(request, self.workers_template, context)

    @staticmethod
    def _event_counters(aliases: Iterable[str]) -> dict[str, dict[str, Any]]:
        """alias -> hostname -> the recorder's counts, in one query.

        Empty when the recorder never ran; a database error only costs the column.
        """
        try:
            return worker_counters_by_app(aliases)
        except DatabaseError:
            return {}

    def worker_view(self, request: HttpRequest, alias: str, name: str) -> HttpResponse:
        """One worker: status, pool, uptime, queues and the tasks it runs now.

        Asked alone for its running tasks; when it does not answer, the last
        values the record holds are shown with their age. 404 only for a
        worker the record does not know and that does not answer either.
        """
        self._require_view(request)
        if alias not in apps:
            raise Http404(_("No Celery app %(alias)r.") % {"alias": alias})
        status = inspect_all([alias])[alias]
        known = status.worker(name)
        live = read_worker(alias, name) if status.reachable else None
        worker = live or known
        if worker is None and status.reachable:
            raise Http404(_("No worker %(name)r seen on app %(alias)r.")
                          % {"name": name, "alias": alias})
        started_at = None
        if worker is not None and worker.uptime is not None and worker.values_at is not None:
            started_at = worker.values_at - timedelta(seconds=worker.uptime)
        now = timezone.now()
        context = self._context(
            request, _("Worker %(name)s") % {"name": name}, status=status, worker=worker,
            worker_name=name, events=self._event_counters([alias]).get(alias, {}).get(name),
            started_at=started_at, live=live is not None,
            values_age=worker.values_age(now) if worker is not None and live is None else None,
            no_reply_timeout=conf.get("INSPECT_TIMEOUT"),
            facts=workers_table.facts(
                worker, list(FULL_COMMANDS) if live else status.commands,
                live is not None or (worker.values_at is not None
                                     and worker.values_at == status.read_at))
            if worker else [])
        return TemplateResponse(request, self.worker_template, context)

    def locks_view(self, request: HttpRequest) -> HttpResponse:
        """Every lock definition with its current holders, read through its backend."""
        self._require_view(request)
        context = self._context(
            request, _("Lock holders"), rows=self.holder_rows(LockDefinition.objects.all()),
            can_force_release=self.has_force_release_permission(request),
            force_release_url=self._url("force_release"),
            lockdefinition_url=reverse("admin:django_celery_adv_lockdefinition_changelist",
                                       current_app=self.admin_site.name))
        return TemplateResponse(request, self.locks_template, context)

    def holder_rows(self, definitions: Iterable[LockDefinition]) -> list[HolderRow]:
        reader = HolderReader()  # a backend that failed is not asked again
        descriptions: dict[str, str] = {}
        rows = []
        for definition in definitions:
            alias = definition.backend
            if alias not in descriptions:
                descriptions[alias] = describe_backend(alias)
            reading = reader.read(definition.name, definition.backend)
            rows.append(HolderRow(definition, descriptions[alias], reading.leases,
                                  reading.error))
        return rows

    def force_release_view(self, request: HttpRequest) -> HttpResponse:
        return require_POST(self._force_release)(request)

    def _force_release(self, request: HttpRequest) -> HttpResponse:
        self._require_view(request)
        if not self.has_force_release_permission(request):
            raise PermissionDenied
        definition = get_object_or_404(LockDefinition, pk=request.POST.get("definition"))
        try:
            token = int(request.POST.get("token", ""))
        except ValueError:
            messages.error(request, _("No valid token to release was given."))
            return HttpResponseRedirect(self._url("locks"))
        try:
            released = force_release(definition.name, token, user=request.user,
                                     backend=definition.backend)
        except CeleryAdvError as e:
            messages.error(request, _("%(lock)s: nothing released: %(error)s") % {
                "lock": definition.name, "error": masked_error(definition.backend, e)})
            return HttpResponseRedirect(self._url("locks"))
        if released:
            messages.success(request, _("Released token %(token)s of %(lock)s.")
                             % {"token": token, "lock": definition.name})
        else:
            messages.warning(request, _("Token %(token)s of %(lock)s was no longer held.")
                             % {"token": token, "lock": definition.name})
        return HttpResponseRedirect(self._url("locks"))
