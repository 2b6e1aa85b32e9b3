"""Admin for task-failure groups: browse, read the traceback, see the trend, resolve.

The list is sorted by last occurrence and filters by app, task and exception;
the detail page shows the newest occurrence and a per-day bar chart of the last
:attr:`TaskFailureAdmin.chart_days` days, drawn as inline SVG by an overridable
template (no JavaScript). Groups are created by workers only: there is no add
page, and the one editable field is ``resolved``.
"""

from __future__ import annotations

import datetime
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import lazy
from django.utils.html import format_html
from django.utils.text import Truncator
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from ..failures import daily_counts
from ..models import TaskFailure

BAR_WIDTH = 16
BAR_GAP = 4
CHART_HEIGHT = 100


def chart_bars(counts: list[tuple[datetime.date, int]]) -> list[dict]:
    """Geometry of one SVG bar per day, scaled to the busiest day."""
    peak = max((count for _, count in counts), default=0) or 1
    bars = []
    for index, (day, count) in enumerate(counts):
        height = round(CHART_HEIGHT * count / peak)
        if count and not height:
            height = 1  # a day with failures is never invisible
        bars.append({
            "day": day, "count": count, "height": height,
            "x": index * (BAR_WIDTH + BAR_GAP), "y": CHART_HEIGHT - height,
            "label_x": index * (BAR_WIDTH + BAR_GAP) + BAR_WIDTH // 2,
            "label": day.strftime("%m-%d") if (len(counts) - 1 - index) % 7 == 0 else "",
        })
    return bars


def last_days_label(days: int) -> str:
    """The chart's label in the active language ("last 30 days")."""
    return ngettext("last %(days)d day", "last %(days)d days", days) % {"days": days}


@admin.register(TaskFailure)
class TaskFailureAdmin(admin.ModelAdmin):
    chart_template = "admin/django_celery_adv/taskfailure/chart.html"
    chart_days = 30

    list_display = ["task_name", "exception_name", "message", "app_alias", "count", "last_seen",
                    "resolved"]
    list_display_links = ["task_name", "exception_name"]
    list_filter = ["resolved", "app_alias", "task_name", "exception_type"]
    search_fields = ["task_name", "exception_type", "location", "last_message", "last_task_id"]
    ordering = ["-last_seen"]
    actions = ["mark_resolved"]
    readonly_fields = ["task_name", "exception_type", "location", "app_alias", "count",
                       "first_seen", "last_seen", "resolved_at", "last_task_id",
                       "last_hostname", "last_message", "last_args", "last_kwargs",
                       "traceback", "chart", "fingerprint", "task_records"]
    fieldsets = [
        (None, {"fields": ["task_name", "exception_type", "location", "app_alias", "count",
                           "first_seen", "last_seen", "resolved", "resolved_at",
                           "task_records"]}),
        (_("Failures per day"), {"fields": ["chart"]}),
        (_("Last occurrence"), {"fields": ["last_task_id", "last_hostname", "last_message",
                                        "last_args", "last_kwargs", "traceback"]}),
        (_("Grouping"), {"fields": ["fingerprint"], "classes": ["collapse"]}),
    ]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description=_("task records"))
    def task_records(self, obj: TaskFailure) -> str:
        # The event recorder's history of this task's failures, and of the newest one.
        changelist = reverse("admin:django_celery_adv_taskrecord_changelist")
        return format_html('<a href="{}?{}">{}</a> · <a href="{}?q={}">{}</a>', changelist,
                           urlencode({"name": obj.task_name, "state__exact": "FAILURE"}),
                           _("all failed runs"), changelist, obj.last_task_id,
                           _("the last one"))

    @admin.display(description=_("exception"), ordering="exception_type")
    def exception_name(self, obj: TaskFailure) -> str:
        return obj.exception_type.rpartition(".")[2]

    @admin.display(description=_("last message"))
    def message(self, obj: TaskFailure) -> str:
        return Truncator(obj.last_message).chars(80)

    @admin.display(description=_("traceback"))
    def traceback(self, obj: TaskFailure) -> str:
        return format_html('<pre class="dca-traceback" style="white-space: pre-wrap; '
                           'margin: 0;">{}</pre>', obj.last_traceback or "-")

    @admin.display(description=lazy(last_days_label, str)(chart_days))
    def chart(self, obj: TaskFailure) -> str:
        if obj.pk is None:
            return "-"
        counts = daily_counts(obj, self.chart_days)
        bars = chart_bars(counts)
        return render_to_string(self.chart_template, {
            "failure": obj, "bars": bars, "days": self.chart_days,
            "total": sum(count for _, count in counts),
            "peak": max(count for _, count in counts),
            # room on the right for the last day's label, centred under its bar
            "width": len(bars) * (BAR_WIDTH + BAR_GAP) + BAR_WIDTH, "bar_width": BAR_WIDTH,
            "height": CHART_HEIGHT,
        })

    def save_model(self, request, obj, form, change):
        if "resolved" in form.changed_data:
            obj.resolved_at = timezone.now() if obj.resolved else None
        super().save_model(request, obj, form, change)

    @admin.action(description=_("Mark the selected failures resolved (a new one reopens them)"),
                  permissions=["change"])
    def mark_resolved(self, request, queryset):
        updated = queryset.filter(resolved=False).update(resolved=True,
                                                         resolved_at=timezone.now())
        self.message_user(request, _("Marked %(count)d failure group(s) resolved.")
                          % {"count": updated}, messages.SUCCESS)
