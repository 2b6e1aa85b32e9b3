"""Admin for beat: which beat leads each app, and "run now" through the task's own app.

* "Beat processes" lists every beat's health row (read only; stale rows may be
  deleted) under a per-app summary: leader, since, token, last tick, next due
  entry, standbys, and the problem ``celery_status --require-beat`` would report.
* django-celery-beat's periodic task admin is replaced by a subclass with an
  "App" choice (``PeriodicTaskApp``, for tasks routing leaves to the default
  app) and an "app" column; its "Run selected tasks" action sends each task
  through the app its beat would use
  (:func:`django_celery_adv.beat.scheduler.task_owner`), not ``current_app``.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.db import DatabaseError
from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from ..beat.health import app_health
from ..models import BeatNode
from ..registry import apps


@admin.register(BeatNode)
class BeatNodeAdmin(admin.ModelAdmin):
    change_list_template = "admin/django_celery_adv/beat/change_list.html"
    list_display = ["app_alias", "role", "hostname", "pid", "token", "leader_since",
                    "last_tick_age", "tick_lag", "next_due", "sent"]
    list_filter = ["app_alias", "role"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description=_("last tick"), ordering="last_tick")
    def last_tick_age(self, obj: BeatNode) -> str:
        return _("%(seconds).1f s ago") % {
            "seconds": (timezone.now() - obj.last_tick).total_seconds()}

    @admin.display(description=_("next due entry"))
    def next_due(self, obj: BeatNode) -> str:
        if not obj.next_due_name:
            return "-"
        when = obj.next_due_at.strftime("%H:%M:%S") if obj.next_due_at else "?"
        return _("%(entry)s at %(time)s") % {"entry": obj.next_due_name, "time": when}

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> Any:
        try:
            summary = list(app_health(list(apps)).values())
        except DatabaseError as e:
            summary = []
            self.message_user(request, _("Cannot read beat health: %(error)s") % {"error": e},
                              messages.ERROR)
        return super().changelist_view(request, {**(extra_context or {}),
                                                 "beat_summary": summary})


if "django_celery_beat" in settings.INSTALLED_APPS:
    from django import forms
    from django_celery_beat import admin as beat_admin
    from django_celery_beat.models import PeriodicTask
    from kombu.utils.json import loads

    from ..beat.scheduler import task_owner
    from ..models import PeriodicTaskApp

    def chosen_app(name: str) -> str | None:
        return PeriodicTaskApp.objects.filter(periodic_task=name).values_list(
            "app_alias", flat=True).first()

    class PeriodicTaskForm(beat_admin.PeriodicTaskForm):
        app = forms.ChoiceField(
            required=False, label=_("App"),
            help_text=_("The app whose beat sends it, for a task that routing leaves to "
                        "the default app (a task bound to an app or matched by TASK_APPS "
                        "always goes to that app)."))

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.fields["app"].choices = [("", _("by routing")), *((a, a) for a in apps)]
            if self.instance.pk:
                self.initial["app"] = chosen_app(self.instance.name) or ""

    class PeriodicTaskAdmin(beat_admin.PeriodicTaskAdmin):
        """django-celery-beat's periodic task admin, plus the app that sends each task;
        "run now" sends through that app, not ``current_app``."""

        form = PeriodicTaskForm
        list_display = [*beat_admin.PeriodicTaskAdmin.list_display, "app"]
        fieldsets = ((None, {**beat_admin.PeriodicTaskAdmin.fieldsets[0][1], "fields": (
            *beat_admin.PeriodicTaskAdmin.fieldsets[0][1]["fields"], "app")}),
            *beat_admin.PeriodicTaskAdmin.fieldsets[1:])

        @admin.display(description=_("app"))
        def app(self, obj: PeriodicTask) -> str:
            return task_owner(obj.task, chosen_app(obj.name))

        def save_model(self, request: HttpRequest, obj: PeriodicTask, form: Any,
                       change: bool) -> None:
            super().save_model(request, obj, form, change)
            PeriodicTaskApp.objects.filter(periodic_task=form.initial.get("name")).delete()
            if form.cleaned_data.get("app"):
                PeriodicTaskApp.objects.update_or_create(
                    periodic_task=obj.name, defaults={"app_alias": form.cleaned_data["app"]})
            else:
                PeriodicTaskApp.objects.filter(periodic_task=obj.name).delete()

        @admin.action(description=_("Run selected tasks"))
        def run_tasks(self, request: HttpRequest, queryset: Any) -> None:
            sent = 0
            for row in queryset:
                app = apps[task_owner(row.task, chosen_app(row.name))]
                options = {"queue": row.queue} if row.queue else {}
                options["headers"] = {"periodic_task_name": row.name}
                app.send_task(row.task, args=loads(row.args or "[]"),
                              kwargs=loads(row.kwargs or "{}"), **options)
                sent += 1
            self.message_user(request, ngettext("%d task was sent to run now.",
                                                "%d tasks were sent to run now.", sent) % sent)

    if admin.site.is_registered(PeriodicTask):
        admin.site.unregister(PeriodicTask)
    admin.site.register(PeriodicTask, PeriodicTaskAdmin)
