"""Admin **Tasks** page: the task history the event recorder keeps (``TaskRecord``).

* Filters by app, state, task name, worker and received time; search by task
  id (exact, also parent and root id) or by text in the arguments; every
  column sortable.
* **Fixed query count, bounded cost**: no ``COUNT(*)`` over the whole table.
  :class:`CappedPaginator` counts at most ten pages beyond the one shown
  (``SELECT COUNT(*) FROM (... LIMIT n)``) and the page says "n+" when there
  are more; the filters' choices come from the recorder's per-app counters
  (one query), not from ``SELECT DISTINCT`` over the records.
* Detail page: the record read-only, links to the parent, the root, the
  children and the task-failure group.
* Actions, each needing its own permission (``retry_taskrecord``,
  ``revoke_taskrecord``, ``terminate_taskrecord``): from the list (selected
  tasks) or from the detail page (a POST; 403 without the permission, the
  login page for anonymous users). Each is written to the admin log; a broker
  that is down gives a message, not an error page.
* A database that is down gives a readable page (503), not a 500.
"""

from __future__ import annotations

import re
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.views.main import PAGE_VAR
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import DatabaseError
from django.db.models import Q
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.functional import cached_property
from django.utils.html import format_html
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from .. import conf
from ..events import operations
from ..events.store import recorder_stats
from ..models import TaskFailure, TaskRecord

PERMISSIONS = {
    "retry": "django_celery_adv.retry_taskrecord",
    "revoke": "django_celery_adv.revoke_taskrecord",
    "terminate": "django_celery_adv.terminate_taskrecord",
}
#: Pages counted beyond the current one.
PAGES_AHEAD = 10
#: Children listed on the detail page.
MAX_CHILDREN = 50
_EXCEPTION_CLASS = re.compile(r"^\s*([A-Za-z_][\w.]*)")


class CappedPaginator(Paginator):
    """A paginator whose count stops at ``cap`` rows (``capped`` says it did)."""

    def __init__(self, object_list, per_page, *, cap: int, **kwargs: Any) -> None:
        super().__init__(object_list, per_page, **kwargs)
        self.cap = cap
        self.capped = False

    @cached_property
    def count(self) -> int:
        counted = self.object_list[:self.cap + 1].count()
        self.capped = counted > self.cap
        return min(counted, self.cap)


def _stats(request: HttpRequest) -> dict:
    """The recorder's counters of every app, read once per request."""
    if not hasattr(request, "_dca_recorder_stats"):
        request._dca_recorder_stats = recorder_stats()
    return request._dca_recorder_stats


class AppFilter(admin.SimpleListFilter):
    title = _("app")
    parameter_name = "app_alias"

    def lookups(self, request, model_admin):
        return [(alias, alias) for alias in conf.app_settings()]

    def queryset(self, request, queryset):
        return queryset.filter(app_alias=self.value()) if self.value() else queryset


class TaskNameFilter(admin.SimpleListFilter):
    title = _("task name")
    parameter_name = "name"

    def lookups(self, request, model_admin):
        names = {name for stats in _stats(request).values() for name in stats.task_counts}
        return [(name, name) for name in sorted(names - {"?", "(other)"})]

    def queryset(self, request, queryset):
        return queryset.filter(name=self.value()) if self.value() else queryset


class WorkerFilter(admin.SimpleListFilter):
    title = _("worker")
    parameter_name = "worker"

    def lookups(self, request, model_admin):
        hosts = {host for stats in _stats(request).values() for host in stats.workers}
        return [(host, host) for host in sorted(hosts)]

    def queryset(self, request, queryset):
        return queryset.filter(worker=self.value()) if self.value() else queryset


@admin.register(TaskRecord)
class TaskRecordAdmin(admin.ModelAdmin):
    change_list_template = "admin/django_celery_adv/taskrecord/change_list.html"
    change_form_template = "admin/django_celery_adv/taskrecord/change_form.html"
    unavailable_template = "admin/django_celery_adv/taskrecord/unavailable.html"

    # Every sortable column has an index (1,000,000 rows sort in milliseconds).
    list_display = ["task_id", "name", "app_alias", "state", "worker", "received_at",
                    "runtime_display", "retries_display"]
    list_display_links = ["task_id"]
    list_filter = [AppFilter, "state", TaskNameFilter, WorkerFilter,
                   ("received_at", admin.DateFieldListFilter)]
    search_fields = ["task_id", "args", "kwargs"]
    search_help_text = _("A task id (also finds its children), or text in the arguments.")
    ordering = ["-id"]
    show_full_result_count = False
    list_per_page = 50
    actions = ["retry_tasks", "revoke_tasks", "terminate_tasks"]
    fieldsets = [
        (None, {"fields": ["task_id", "name", "app_alias", "state", "worker", "retries"]}),
        (_("Arguments and outcome"), {"fields": ["args", "kwargs", "retryable", "result",
                                                 "exception", "traceback_display"]}),
        (_("Times"), {"fields": ["received_at", "started_at", "succeeded_at", "failed_at",
                                 "runtime", "queue_wait", "updated_at"]}),
        (_("Workflow"), {"fields": ["parent_id", "root_id"]}),
    ]

    # -- permissions ------------------------------------------------------------------

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_retry_permission(self, request) -> bool:
        return request.user.has_perm(PERMISSIONS["retry"])

    def has_revoke_permission(self, request) -> bool:
        return request.user.has_perm(PERMISSIONS["revoke"])

    def has_terminate_permission(self, request) -> bool:
        return request.user.has_perm(PERMISSIONS["terminate"])

    def get_readonly_fields(self, request, obj=None):
        return [f for fields in (fs[1]["fields"] for fs in self.fieldsets) for f in fields]

    # -- list ---------------------------------------------------------------------------

    @admin.display(description=_("runtime"), ordering="runtime")
    def runtime_display(self, obj: TaskRecord) -> str:
        return "-" if obj.runtime is None else \
            gettext("%(seconds).3f s") % {"seconds": obj.runtime}

    @admin.display(description=_("retries"))
    def retries_display(self, obj: TaskRecord) -> int:
        return obj.retries

    @admin.display(description=_("traceback"))
    def traceback_display(self, obj: TaskRecord) -> str:
        return format_html('<pre style="white-space: pre-wrap; margin: 0;">{}</pre>',
                           obj.traceback or "-")

    def get_paginator(self, request, queryset, per_page, orphans=0,
                      allow_empty_first_page=True):
        try:
            page = max(1, int(request.GET.get(PAGE_VAR, 1)))
        except ValueError:
            page = 1
        return CappedPaginator(queryset, per_page, orphans=orphans,
                               allow_empty_first_page=allow_empty_first_page,
                               cap=(page + PAGES_AHEAD) * per_page)

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        if re.fullmatch(r"[\w-]{8,255}", term) and "-" in term:  # looks like a task id
            return queryset.filter(Q(task_id=term) | Q(parent_id=term) | Q(root_id=term)), False
        return queryset.filter(Q(args__icontains=term) | Q(kwargs__icontains=term)), False

    def changelist_view(self, request, extra_context=None):
        try:
            response = super().changelist_view(request, extra_context)
            if hasattr(response, "render"):
                response.render()  # a dead database fails here, inside the try
            return response
        except DatabaseError as error:
            return self._unavailable(request, error)

    def _unavailable(self, request, error: BaseException) -> HttpResponse:
        from ..masking import mask_text

        context = {**self.admin_site.each_context(request), "opts": self.opts,
                   "title": _("Tasks"),
                   "error": mask_text(f"{type(error).__name__}: {error}", limit=300)}
        return TemplateResponse(request, self.unavailable_template, context, status=503)

    # -- detail -------------------------------------------------------------------------

    def change_view(self, request, object_id, form_url="", extra_context=None):
        try:
            record = self.get_object(request, object_id)
            extra = {**(extra_context or {}),
                     **(self.related(record) if record is not None else {}),
                     "can_retry": self.has_retry_permission(request),
                     "can_revoke": self.has_revoke_permission(request),
                     "can_terminate": self.has_terminate_permission(request)}
            response = super().change_view(request, object_id, form_url, extra)
            if hasattr(response, "render"):
                response.render()
            return response
        except DatabaseError as error:
            return self._unavailable(request, error)

    def related(self, record: TaskRecord) -> dict[str, Any]:
        """Parent, root, children and the failure group of a record, for the detail page."""
        rows = TaskRecord.objects.filter(app_alias=record.app_alias)
        ids = {i for i in (record.parent_id, record.root_id) if i and i != record.task_id}
        linked = {r.task_id: r for r in rows.filter(task_id__in=ids)} if ids else {}
        # Unordered in SQL so the planner takes the parent_id index, sorted here.
        children = sorted(TaskRecord.objects.filter(parent_id=record.task_id)
                          .exclude(pk=record.pk).order_by()[:MAX_CHILDREN],
                          key=lambda child: child.pk)
        failure = None
        match = _EXCEPTION_CLASS.match(record.exception or "")
        if record.state == TaskRecord.State.FAILURE and match:
            name = match.group(1).rpartition(".")[2]
            failure = TaskFailure.objects.filter(
                Q(exception_type=name) | Q(exception_type__endswith=f".{name}"),
                task_name=record.name).order_by("-last_seen").first()
        return {"parent": linked.get(record.parent_id), "parent_id": record.parent_id,
                "root": linked.get(record.root_id) if record.root_id != record.task_id
                else None,
                "root_id": record.root_id if record.root_id != record.task_id else "",
                "children": children, "failure": failure}

    # -- actions ---------------------------------------------------------------------------

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("<path:object_id>/retry/", wrap(self.action_view), {"action": "retry"},
                 name="django_celery_adv_taskrecord_retry"),
            path("<path:object_id>/revoke/", wrap(self.action_view), {"action": "revoke"},
                 name="django_celery_adv_taskrecord_revoke"),
            path("<path:object_id>/terminate/", wrap(self.action_view),
                 {"action": "terminate"}, name="django_celery_adv_taskrecord_terminate"),
            *super().get_urls(),
        ]

    def action_view(self, request: HttpRequest, object_id: str, action: str) -> HttpResponse:
        """POST only; 403 without the action's permission."""
        if not request.user.has_perm(PERMISSIONS[action]):
            raise PermissionDenied
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not object_id.isdigit():  # the ORM raises ValueError (a 500) for "abc"
            raise Http404
        try:
            record = get_object_or_404(TaskRecord, pk=object_id)
            self.perform(request, action, [record])
        except DatabaseError as error:  # the list and detail pages do the same
            return self._unavailable(request, error)
        return HttpResponseRedirect(
            reverse("admin:django_celery_adv_taskrecord_change", args=[record.pk]))

    def perform(self, request: HttpRequest, action: str, records) -> None:
        """Do ``action`` on each record; one admin-log entry and one message per record."""
        for record in records:
            try:
                if action == "retry":
                    new_id = operations.retry(record)
                    note = gettext("Retried task %(id)s as %(new)s.") % {"id": record.task_id,
                                                                   "new": new_id}
                elif action == "revoke":
                    operations.revoke(record)
                    note = gettext("Revoked task %(id)s.") % {"id": record.task_id}
                else:
                    operations.revoke(record, terminate=True)
                    note = gettext("Terminated task %(id)s (SIGTERM).") % {"id": record.task_id}
            except operations.TaskActionError as error:
                self.message_user(request, str(error), messages.ERROR)
                continue
            self.log_change(request, record, note)
            self.message_user(request, note, messages.SUCCESS)

    @admin.action(description=_("Retry the selected tasks with the same arguments"),
                  permissions=["retry"])
    def retry_tasks(self, request, queryset):
        self.perform(request, "retry", queryset[:100])

    @admin.action(description=_("Revoke the selected tasks"), permissions=["revoke"])
    def revoke_tasks(self, request, queryset):
        self.perform(request, "revoke", queryset[:100])

    @admin.action(description=_("Terminate the selected tasks (SIGTERM)"),
                  permissions=["terminate"])
    def terminate_tasks(self, request, queryset):
        self.perform(request, "terminate", queryset[:100])
