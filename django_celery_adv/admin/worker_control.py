"""Admin remote control of one worker: pool, autoscale, consumers, task limits, shutdown.

Views of the Monitoring admin (:mod:`.monitoring` adds
:meth:`WorkerControlPages.urls` to its URLs), linked from the worker page:

* ``admin_site.admin_view``: anonymous and non-staff users go to the login
  page; CSRF protection; ``never_cache``;
* the control page needs ``django_celery_adv.view_monitoring`` and shows the
  form of each action the user may run;
* each action is a POST (CSRF token) and needs its own permission (403
  otherwise), see :data:`ACTIONS`; ``shutdown`` first shows a confirmation
  page on GET;
* every action sent is one admin-log entry (:mod:`.oplog`) with its
  arguments and the worker's answer; the answer (ok or error, "no reply", a
  broker that is down) is shown as a message.

Commands go through :mod:`django_celery_adv.control` to the one worker named.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path
from django.utils.functional import Promise
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from .. import control
from ..registry import apps, task_alias
from .oplog import log_operator_action

if TYPE_CHECKING:
    from .monitoring import MonitoringAdmin

#: Celery's rate syntax: a number, optionally per second, minute or hour.
RATE_PATTERN = re.compile(r"^\d+(\.\d+)?(/[smh])?$")
#: Most processes one pool action adds or removes.
MAX_POOL_STEP = 64
#: id of the <datalist> of task names the task-name fields suggest.
TASK_NAMES_ID = "dca-task-names"


class PoolForm(forms.Form):
    n = forms.IntegerField(label=gettext_lazy("Processes"), min_value=1,
                           max_value=MAX_POOL_STEP, initial=1)


class AutoscaleForm(forms.Form):
    max_concurrency = forms.IntegerField(label=gettext_lazy("Maximum"), min_value=1)
    min_concurrency = forms.IntegerField(label=gettext_lazy("Minimum"), min_value=0)

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if (data.get("min_concurrency") is not None and data.get("max_concurrency") is not None
                and data["min_concurrency"] > data["max_concurrency"]):
            raise forms.ValidationError(gettext_lazy("The minimum exceeds the maximum."))
        return data


class QueueForm(forms.Form):
    queue = forms.CharField(label=gettext_lazy("Queue"), max_length=255)


class RateLimitForm(forms.Form):
    task_name = forms.CharField(label=gettext_lazy("Task name"), max_length=255,
                                widget=forms.TextInput(attrs={"list": TASK_NAMES_ID}))
    rate = forms.CharField(label=gettext_lazy("Rate"), max_length=32,
                           help_text=gettext_lazy('e.g. "10/m", "2/s", "100/h"; "0" lifts it.'))

    def clean_rate(self) -> str:
        rate = self.cleaned_data["rate"].strip()
        if not RATE_PATTERN.match(rate):
            raise forms.ValidationError(gettext_lazy(
                'A number, optionally followed by /s, /m or /h (e.g. "10/m").'))
        return rate


class TimeLimitForm(forms.Form):
    task_name = forms.CharField(label=gettext_lazy("Task name"), max_length=255,
                                widget=forms.TextInput(attrs={"list": TASK_NAMES_ID}))
    soft = forms.FloatField(label=gettext_lazy("Soft limit (s)"), min_value=0, required=False)
    hard = forms.FloatField(
        label=gettext_lazy("Hard limit (s)"), min_value=0, required=False,
        help_text=gettext_lazy("Celery sets both limits at once: a blank field removes "
                               "that limit if the task had one."))

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        soft, hard = data.get("soft"), data.get("hard")
        if soft is not None and hard is not None and soft > hard:
            raise forms.ValidationError(gettext_lazy("The soft limit exceeds the hard limit."))
        return data


class ShutdownForm(forms.Form):
    """Nothing to fill in: the confirmation page is the form."""


@dataclass(frozen=True)
class Action:
    """One remote-control action: its form, permission and the call it makes."""

    name: str
    label: str | Promise
    #: Codename on the Monitoring model (``django_celery_adv.<codename>``).
    permission: str
    form: type[forms.Form]
    run: Callable[[str, str, dict[str, Any]], control.ControlReply]

    @property
    def perm(self) -> str:
        return f"django_celery_adv.{self.permission}"


ACTIONS: dict[str, Action] = {action.name: action for action in (
    Action("pool_grow", gettext_lazy("Grow the pool"), "resize_worker_pool", PoolForm,
           lambda alias, worker, d: control.pool_grow(alias, worker, d["n"])),
    Action("pool_shrink", gettext_lazy("Shrink the pool"), "resize_worker_pool", PoolForm,
           lambda alias, worker, d: control.pool_shrink(alias, worker, d["n"])),
    Action("autoscale", gettext_lazy("Autoscale"), "autoscale_worker", AutoscaleForm,
           lambda alias, worker, d: control.autoscale(
               alias, worker, d["max_concurrency"], d["min_concurrency"])),
    Action("add_consumer", gettext_lazy("Consume a queue"), "manage_worker_consumers",
           QueueForm, lambda alias, worker, d: control.add_consumer(alias, worker, d["queue"])),
    Action("cancel_consumer", gettext_lazy("Stop consuming a queue"),
           "manage_worker_consumers", QueueForm,
           lambda alias, worker, d: control.cancel_consumer(alias, worker, d["queue"])),
    Action("rate_limit", gettext_lazy("Task rate limit"), "set_task_rate_limit", RateLimitForm,
           lambda alias, worker, d: control.rate_limit(alias, worker, d["task_name"],
                                                       d["rate"])),
    Action("time_limit", gettext_lazy("Task time limits"), "set_task_time_limit",
           TimeLimitForm, lambda alias, worker, d: control.time_limit(
               alias, worker, d["task_name"], d["soft"], d["hard"])),
    Action("shutdown", gettext_lazy("Shut down"), "shutdown_worker", ShutdownForm,
           lambda alias, worker, d: control.shutdown(alias, worker)),
)}


def task_names(alias: str) -> list[str]:
    """The app's task names as this process knows them (no broadcast to ask a worker).

    Celery's own tasks and shared tasks that ``TASK_APPS`` routes to another
    app are left out.
    """
    app = apps[alias]
    app.loader.import_default_modules()  # the tasks modules (imported once)
    return sorted(name for name in app.tasks if not name.startswith("celery.")
                  and task_alias(name) in (None, alias))


def _arguments(data: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in data.items() if value is not None)


class WorkerControlPages:
    """The control page of one worker and one POST endpoint per action."""

    control_template = "admin/django_celery_adv/monitoring/worker_control.html"
    shutdown_template = "admin/django_celery_adv/monitoring/shutdown_confirm.html"

    def __init__(self, model_admin: MonitoringAdmin) -> None:
        self.model_admin = model_admin

    def urls(self) -> list:
        name, wrap = self.model_admin.url_name, self.model_admin.admin_site.admin_view
        return [
            path("workers/<str:alias>/<str:name>/control/", wrap(self.control_view),
                 name=name("worker_control")),
            path("workers/<str:alias>/<str:name>/control/<str:action>/",
                 wrap(self.action_view), name=name("worker_action")),
        ]

    def _page(self, request: HttpRequest, alias: str, name: str,
              bound: tuple[str, forms.Form] | None = None) -> HttpResponse:
        forms_shown = []
        for action in ACTIONS.values():
            if not request.user.has_perm(action.perm):
                continue
            form = bound[1] if bound and bound[0] == action.name else \
                action.form(auto_id=f"id_{action.name}_%s")
            forms_shown.append({"action": action, "form": form,
                                "url": self.model_admin._url("worker_action", alias, name,
                                                             action.name)})
        context = self.model_admin._context(
            request, _("Control worker %(name)s") % {"name": name}, alias=alias,
            worker_name=name, actions=forms_shown, task_names_id=TASK_NAMES_ID,
            task_names=task_names(alias),
            worker_url=self.model_admin._url("worker", alias, name))
        return TemplateResponse(request, self.control_template, context)

    def control_view(self, request: HttpRequest, alias: str, name: str) -> HttpResponse:
        """The forms of the actions this user may run on the worker."""
        self.model_admin._require_view(request)
        if alias not in apps:
            raise Http404(_("No Celery app %(alias)r.") % {"alias": alias})
        return self._page(request, alias, name)

    def action_view(self, request: HttpRequest, alias: str, name: str,
                    action: str) -> HttpResponse:
        """POST: run ``action``; GET of ``shutdown``: its confirmation page."""
        self.model_admin._require_view(request)
        chosen = ACTIONS.get(action)
        if alias not in apps or chosen is None:
            raise Http404(_("No such app or action."))
        if not request.user.has_perm(chosen.perm):
            raise PermissionDenied
        control_url = self.model_admin._url("worker_control", alias, name)
        if request.method != "POST":
            if chosen.name == "shutdown":
                context = self.model_admin._context(
                    request, _("Shut down worker %(name)s?") % {"name": name}, alias=alias,
                    worker_name=name, control_url=control_url,
                    action_url=self.model_admin._url("worker_action", alias, name, "shutdown"))
                return TemplateResponse(request, self.shutdown_template, context)
            return HttpResponseRedirect(control_url)
        form = chosen.form(request.POST, auto_id=f"id_{chosen.name}_%s")
        if not form.is_valid():
            return self._page(request, alias, name, bound=(chosen.name, form))
        reply = chosen.run(alias, name, form.cleaned_data)
        outcome = "ok" if reply.ok else "error"
        log_operator_action(
            request.user, alias, f"worker:{name}", f"worker {name} ({alias})",
            f"{chosen.name}({_arguments(form.cleaned_data)}): {outcome}: {reply.message}")
        text = _("%(action)s on %(worker)s: %(message)s") % {
            "action": chosen.label, "worker": name, "message": reply.message}
        (messages.success if reply.ok else messages.error)(request, text)
        if chosen.name == "shutdown" and reply.ok:
            return HttpResponseRedirect(self.model_admin._url("changelist"))
        return HttpResponseRedirect(control_url)
