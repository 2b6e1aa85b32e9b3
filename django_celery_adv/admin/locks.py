"""Admin of lock definitions: tune a lock, see who holds it now, force-release it.

Lock data is read and changed only through :mod:`django_celery_adv.locks`
(``holders`` and ``force_release``); the admin never talks to a lock server
or a backend object itself.

Guarantees:

* a lock server that fails never fails a page or an action: its ``LockError``
  becomes an admin message or an "unavailable" cell, its text masked (URL
  passwords and every secret of the backend's OPTIONS);
* one changelist request asks a backend nothing more once it failed: N locks
  on a server that is down cost one connection attempt, not N timeouts;
* force release writes one admin-log entry per lock it freed something of
  (``locks.force_release`` writes it), and stops asking a backend that failed
  for the rest of the action;
* an existing lock's name is read-only: code finds its row by name, so a
  rename would detach the row and the next use would recreate the old name
  with the code's defaults;
* a lock's backend cannot be changed while the old backend lists holders, nor
  while the old backend (if still configured) cannot be read: the new backend would grant the same
  slots again (token 1 included) next to the running holders. A task that
  takes the lock on the old backend in the moment between this check and the
  workers seeing the change (``definitions.CHECK_SECONDS``) is not caught.
"""

from __future__ import annotations

import logging
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.loader import render_to_string
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _
from django.utils.translation import pgettext_lazy

from .. import conf
from ..exceptions import CeleryAdvError
from ..locks import force_release, holders
from ..locks.api import describe_holder
from ..locks.operations import HolderReader, HolderReading, masked_error
from ..models import LockDefinition

logger = logging.getLogger(__name__)


class LockDefinitionForm(forms.ModelForm):
    backend = forms.ChoiceField(choices=(), label=_("Backend"))

    class Meta:
        model = LockDefinition
        fields = ["name", "backend", "capacity", "description", "ttl", "wait", "on_busy",
                  "beat_on_busy", "retry_countdown", "retry_jitter", "retry_backoff",
                  "max_retries"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["backend"].choices = [(a, a) for a in conf.lock_backend_settings()]

    def clean_backend(self) -> str:
        backend = self.cleaned_data["backend"]
        if self.instance.pk is None:
            return backend
        # The stored row, not the instance: that is what workers go by.
        old = LockDefinition.objects.filter(pk=self.instance.pk).values_list(
            "backend", flat=True).first()
        if old is None or old == backend:
            return backend
        if old not in conf.lock_backend_settings():
            # Nothing in this deployment can hold it there; refusing would leave
            # the lock stuck on a backend that no longer exists.
            return backend
        name = self.instance.name
        try:
            leases = holders(name, backend=old)
        except CeleryAdvError as e:
            raise ValidationError(
                _("Cannot move %(name)r off backend %(old)r: its holders there cannot be read "
                  "(%(error)s). Try again once that backend answers."),
                code="old_backend_unreadable",
                params={"name": name, "old": old, "error": masked_error(old, e)}) from e
        if leases:
            raise ValidationError(
                _("Cannot move %(name)r off backend %(old)r while it is held there by: "
                  "%(holders)s. The new backend would grant the same slots again; wait until "
                  "they finish or force-release them first."),
                code="held_on_old_backend",
                params={"name": name, "old": old,
                        "holders": "; ".join(describe_holder(lease.holder) for lease in leases)})
        return backend


class LockChangeList(ChangeList):
    """The changelist, with the holders of the page's locks read once per request."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        reader = HolderReader()
        for definition in self.result_list:  # evaluated once; the template reuses the rows
            definition.holders_reading = reader.read(definition.name, definition.backend)


@admin.register(LockDefinition)
class LockDefinitionAdmin(admin.ModelAdmin):
    form = LockDefinitionForm
    #: The "current holders" table of the change page (override it per project).
    holders_template = "admin/django_celery_adv/lockdefinition/holders.html"

    list_display = ["name", "backend", "capacity", "holders_now", "state", "updated_at"]
    list_filter = ["backend", "on_busy"]
    search_fields = ["name", "description"]
    readonly_fields = ["current_holders", "created_at", "updated_at"]
    actions = ["force_release"]
    fieldsets = [
        (None, {"fields": ["name", "backend", "capacity", "description"]}),
        (_("Lease and retries"), {"fields": ["ttl", "wait", "on_busy", "beat_on_busy",
                                          "retry_countdown", "retry_jitter", "retry_backoff",
                                          "max_retries"]}),
        (_("Now"), {"fields": ["current_holders", "created_at", "updated_at"]}),
    ]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        fields = list(super().get_readonly_fields(request, obj))
        # Code finds its row by name: renaming would detach the row.
        return ["name", *fields] if obj is not None else fields

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return LockChangeList

    @staticmethod
    def _reading(obj: LockDefinition) -> HolderReading:
        reading = getattr(obj, "holders_reading", None)
        return reading if reading is not None else HolderReader().read(obj.name, obj.backend)

    @admin.display(description=_("holders now"))
    def holders_now(self, obj: LockDefinition) -> str:
        reading = self._reading(obj)
        if reading.error is not None:
            return format_html('<span class="dca-error" title="{}">{}</span>',
                               reading.error, _("unavailable"))
        return f"{len(reading.leases)} / {obj.capacity}"

    @admin.display(description=_("state"), ordering="capacity")
    def state(self, obj: LockDefinition) -> str:
        # A context: Django's own "active" (a user's) would win and has another gender.
        return pgettext_lazy("lock state", "paused") if obj.capacity == 0 \
            else pgettext_lazy("lock state", "active")

    @admin.display(description=_("current holders"))
    def current_holders(self, obj: LockDefinition) -> str:
        if obj.pk is None:
            return "-"
        reading = self._reading(obj)
        return render_to_string(self.holders_template, {
            "definition": obj, "leases": reading.leases, "error": reading.error})

    def has_force_release_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("django_celery_adv.force_release_lock")

    @admin.action(description=_("Force-release every holder of the selected locks"),
                  permissions=["force_release"])
    def force_release(self, request: HttpRequest, queryset: QuerySet[LockDefinition]) -> None:
        released = 0
        failed: dict[str, str] = {}  # alias -> error: a server that is down is asked once
        skipped: list[str] = []
        for definition in queryset:
            alias = definition.backend
            if alias in failed:
                skipped.append(definition.name)
                continue
            try:  # the module's force_release, not this method (a method is no global)
                released += len(force_release(definition.name, user=request.user,
                                              backend=alias))
            except CeleryAdvError as e:
                failed[alias] = masked_error(alias, e)
                self.message_user(request, _("%(lock)s: nothing released: %(error)s")
                                  % {"lock": definition.name, "error": failed[alias]},
                                  messages.ERROR)
        if skipped:
            self.message_user(request, _("Not tried, their backend failed above: %(locks)s.")
                              % {"locks": ", ".join(skipped)}, messages.WARNING)
        if released or not failed:
            self.message_user(request, _("Released %(count)d lease(s).") % {"count": released},
                              messages.SUCCESS)
