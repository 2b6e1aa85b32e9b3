"""Admin for lock definitions: tune locks, see who holds them, force-release."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, LogEntry
from django.utils.html import format_html, format_html_join

from . import conf
from .exceptions import CeleryAdvError
from .locks.backends import lock_backends
from .locks.definitions import policies
from .models import LockDefinition


class LockDefinitionForm(forms.ModelForm):
    backend = forms.ChoiceField(choices=())

    class Meta:
        model = LockDefinition
        fields = ["name", "backend", "capacity", "description", "ttl", "wait", "on_busy",
                  "retry_countdown", "retry_jitter", "retry_backoff", "max_retries"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["backend"].choices = [(a, a) for a in conf.lock_backend_settings()]


def read_holders(definition: LockDefinition):
    """(leases, error text): a backend that is down gives its error, not a traceback."""
    try:
        return lock_backends[definition.backend].holders(definition.name), None
    except CeleryAdvError as e:
        return [], str(e)


@admin.register(LockDefinition)
class LockDefinitionAdmin(admin.ModelAdmin):
    form = LockDefinitionForm
    list_display = ["name", "backend", "capacity", "holders_now", "paused", "updated_at"]
    list_filter = ["backend", "on_busy"]
    search_fields = ["name", "description"]
    readonly_fields = ["current_holders", "created_at", "updated_at"]
    actions = ["force_release"]
    fieldsets = [
        (None, {"fields": ["name", "backend", "capacity", "description"]}),
        ("Lease and retries", {"fields": ["ttl", "wait", "on_busy", "retry_countdown",
                                          "retry_jitter", "retry_backoff", "max_retries"]}),
        ("Now", {"fields": ["current_holders", "created_at", "updated_at"]}),
    ]

    @admin.display(description="holders now")
    def holders_now(self, obj: LockDefinition) -> str:
        leases, error = read_holders(obj)
        if error:
            return format_html('<span title="{}">unavailable</span>', error)
        return f"{len(leases)} / {obj.capacity}"

    @admin.display(boolean=True)
    def paused(self, obj: LockDefinition) -> bool:
        return obj.capacity == 0

    @admin.display(description="current holders")
    def current_holders(self, obj: LockDefinition) -> str:
        if obj.pk is None:
            return "-"
        leases, error = read_holders(obj)
        if error:
            return format_html("<strong>{}</strong>", error)
        if not leases:
            return "nobody"
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
                "<td>{}</td></tr>",
            ((lease.slot, lease.holder.task_id or "-", lease.holder.hostname, lease.holder.pid,
              lease.acquired_at, lease.expires_at, lease.token) for lease in leases))
        return format_html("<table><thead><tr><th>slot</th><th>task id</th><th>host</th>"
                           "<th>pid</th><th>since</th><th>expires</th><th>token</th></tr>"
                           "</thead><tbody>{}</tbody></table>", rows)

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        policies.invalidate()

    def has_force_release_permission(self, request) -> bool:
        return request.user.has_perm("django_celery_adv.force_release_lock")

    @admin.action(description="Force-release every holder of the selected locks",
                  permissions=["force_release"])
    def force_release(self, request, queryset):
        released = 0
        for definition in queryset:
            leases, error = read_holders(definition)
            if error:
                self.message_user(request, f"{definition.name}: {error}", messages.ERROR)
                continue
            backend = lock_backends[definition.backend]
            tokens = [lease.token for lease in leases if backend.force_release(
                definition.name, lease.token)]
            released += len(tokens)
            LogEntry.objects.log_actions(request.user.pk, [definition], CHANGE,
                                         change_message=f"Force-released tokens {tokens}")
        self.message_user(request, f"Released {released} lease(s).", messages.SUCCESS)


from . import admin_failures  # noqa: E402,F401,I001
from . import admin_monitoring  # noqa: E402,F401
