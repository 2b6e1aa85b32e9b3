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
renders; a lock backend that failed is not asked again in the same request. The SQL queries of the
workers page do not depend on the number of workers (the session and user,
nothing per worker). Templates use only the admin's CSS and work without
JavaScript; ``?refresh=N`` adds a plain meta refresh every N seconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import DatabaseError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from ..beat.health import app_health
from ..exceptions import CeleryAdvError
from ..locks import force_release
from ..locks.operations import HolderReader, describe_backend, masked_error
from ..models import LockDefinition, Monitoring
from ..monitoring import inspect_all
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
        prefix = f"{self.opts.app_label}_{self.opts.model_name}"
        wrap = self.admin_site.admin_view
        return [
            path("", wrap(self.changelist_view), name=f"{prefix}_changelist"),
            path("workers/<str:alias>/<str:name>/", wrap(self.worker_view),
                 name=f"{prefix}_worker"),
            path("locks/", wrap(self.locks_view), name=f"{prefix}_locks"),
            path("locks/force-release/", wrap(self.force_release_view),
                 name=f"{prefix}_force_release"),
            *QueuePages(self).urls(), *WorkerControlPages(self).urls(),
        ]

    def _url(self, name: str, *args: Any) -> str:
        return reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_{name}",
                       args=args, current_app=self.admin_site.name)

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
        """The workers page: one table per app."""
        self._require_view(request)
        statuses = list(inspect_all().values())
        try:  # beat health of the same apps (the beat processes page has the details)
            beat_summary = list(app_health([s.alias for s in statuses]).values())
        except DatabaseError as e:
            beat_summary, beat_error = [], str(e)
        else:
            beat_error = None
        context = self._context(request, "Celery workers", statuses=statuses,
                                beat_summary=beat_summary, beat_error=beat_error,
                                **(extra_context or {}))
        return TemplateResponse(request, self.workers_template, context)

    def worker_view(self, request: HttpRequest, alias: str, name: str) -> HttpResponse:
        """One worker: status, pool, uptime, queues and the tasks it runs now."""
        self._require_view(request)
        if alias not in apps:
            raise Http404(f"No Celery app {alias!r}.")
        status = inspect_all([alias])[alias]
        worker = status.worker(name)
        if worker is None and status.reachable:
            raise Http404(f"No worker {name!r} seen on app {alias!r}.")
        started_at = None
        if worker is not None and worker.uptime is not None:
            started_at = status.read_at - timedelta(seconds=worker.uptime)
        context = self._context(request, f"Worker {name}", status=status, worker=worker,
                                worker_name=name, started_at=started_at)
        return TemplateResponse(request, self.worker_template, context)

    def locks_view(self, request: HttpRequest) -> HttpResponse:
        """Every lock definition with its current holders, read through its backend."""
        self._require_view(request)
        context = self._context(
            request, "Lock holders", rows=self.holder_rows(LockDefinition.objects.all()),
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
            messages.error(request, "No valid token to release was given.")
            return HttpResponseRedirect(self._url("locks"))
        try:
            released = force_release(definition.name, token, user=request.user,
                                     backend=definition.backend)
        except CeleryAdvError as e:
            messages.error(request, f"{definition.name}: nothing released: "
                                    f"{masked_error(definition.backend, e)}")
            return HttpResponseRedirect(self._url("locks"))
        if released:
            messages.success(request, f"Released token {token} of {definition.name}.")
        else:
            messages.warning(request, f"Token {token} of {definition.name} was no longer held.")
        return HttpResponseRedirect(self._url("locks"))
