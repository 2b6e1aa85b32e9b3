"""Celery apps by alias, built from ``CELERY_ADV["APPS"]`` the way ``caches`` is.

``apps["global"]`` is a :class:`celery.Celery` configured from its own dict,
created on first use and then kept for the life of the process. None of them
is made current on creation (``set_as_current=False``): which app a task is
sent through never depends on process-global state.

Routing, in order:

1. a task made by ``apps[alias].task`` belongs to ``alias`` and is always sent
   through that app's broker;
2. a ``@shared_task`` whose name matches a ``TASK_APPS`` glob goes to that alias;
3. any other shared task goes to the alias made current by :func:`using` in the
   calling thread, else to ``"default"``.

Isolation of apps that share a broker: the ``default`` alias keeps Celery's own
names; every other alias gets, unless its settings name them, its own default
queue (``<alias>``), control exchange (``celery.<alias>``) and event exchange
(``celeryev.<alias>``). So two aliases on one Redis database never consume each
other's tasks nor answer each other's ``inspect`` broadcasts. A configuration
that defeats this by naming the same queue or exchange twice on one broker is a
system-check error (``django_celery_adv.E008`` / ``E009``).
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from celery import Celery, Task
from celery import _state as celery_state
from django.apps import apps as django_apps
from kombu import pools as kombu_pools

from . import conf
from .aliases import AliasRegistry
from .exceptions import ImproperlyConfiguredApp
from .process import after_fork

# Options a caller may hand to apply_async that belong to one broker
# connection; they cannot follow a task that is re-routed to another app.
_CONNECTION_OPTIONS = ("producer", "connection")


def isolation_defaults(alias: str) -> dict[str, str]:
    """Queue and exchange names an alias gets unless its settings name them."""
    if alias == conf.DEFAULT_APP_ALIAS:
        return {}
    return {
        "task_default_queue": alias,
        "control_exchange": f"celery.{alias}",
        "event_exchange": f"celeryev.{alias}",
    }


def task_alias(task_name: str) -> str | None:
    """The alias whose ``TASK_APPS`` glob matches ``task_name``; first match wins."""
    for pattern, alias in conf.task_apps().items():
        if fnmatch.fnmatchcase(task_name, pattern):
            return alias
    return None


class RoutedTask(Task):
    """Task base of every registry app: sends through the app routing picks.

    Celery binds a ``shared_task`` proxy to whatever app is current in the
    calling thread (celery #2609, #3071). Re-routing at send time makes the
    outcome independent of that.
    """

    #: Alias of the app that defined the task with ``apps[alias].task``;
    #: ``None`` for shared tasks, which are routed by name.
    adv_alias: str | None = None

    def apply_async(self, args=None, kwargs=None, task_id=None, producer=None,
                    link=None, link_error=None, shadow=None, **options):
        target = self._routed_app()
        if target is not None and target is not self._get_app():
            options.pop("connection", None)
            return target.tasks[self.name].apply_async(
                args, kwargs, task_id=task_id, link=link, link_error=link_error,
                shadow=shadow, **options,
            )
        return super().apply_async(
            args, kwargs, task_id=task_id, producer=producer, link=link,
            link_error=link_error, shadow=shadow, **options,
        )

    def _routed_app(self) -> Celery | None:
        if self.adv_alias is not None:
            return None  # bound explicitly: it stays on its own app
        alias = task_alias(self.name) or current_alias()
        return apps[alias]


class AdvCelery(Celery):
    """A Celery app that knows its alias; ``app.task`` binds tasks to it alone."""

    task_cls = "django_celery_adv.registry:RoutedTask"

    def __init__(self, alias: str, **kwargs: Any) -> None:
        self.alias = alias
        super().__init__(main=alias, set_as_current=False, **kwargs)

    def task(self, *args: Any, **opts: Any) -> Any:
        # Celery shares app.task tasks with every app by default; here a task
        # defined on one alias must not be registered (and consumed) elsewhere.
        opts.setdefault("shared", False)
        opts.setdefault("adv_alias", self.alias)
        return super().task(*args, **opts)

    def register_task(self, task: Any, **options: Any) -> Any:
        # A class-based task registered on one alias belongs to it, like app.task.
        task = super().register_task(task, **options)
        if getattr(task, "adv_alias", None) is None:
            task.adv_alias = self.alias
        return task

    def __repr__(self) -> str:
        return f"<AdvCelery {self.alias!r}>"


def build_app(alias: str, settings: Mapping[str, Any]) -> AdvCelery:
    """A configured Celery app for ``alias`` (no I/O: Celery connects lazily)."""
    if not isinstance(settings, Mapping):
        raise ImproperlyConfiguredApp(
            f"CELERY_ADV['APPS'][{alias!r}] must be a dict of Celery settings; "
            "run `manage.py check` for details."
        )
    app = AdvCelery(alias)
    app.conf.update({**isolation_defaults(alias), **settings})
    app.autodiscover_tasks(lambda: [cfg.name for cfg in django_apps.get_app_configs()])
    return app


class AppRegistry(AliasRegistry[AdvCelery]):
    """alias -> Celery app, built lazily, one instance per alias per process."""

    kind = "Celery app"
    setting_key = "APPS"

    def configured(self) -> Mapping[str, Mapping[str, Any]]:
        return conf.app_settings()

    def create(self, alias: str, params: Mapping[str, Any]) -> AdvCelery:
        return build_app(alias, params)

    def unknown(self, message: str) -> Exception:
        return ImproperlyConfiguredApp(message)


apps = AppRegistry()


@after_fork
def _leave_the_parents_broker_connections() -> None:
    """In a forked child, drop the broker connection pools inherited from the parent.

    kombu closes inherited pools in a child (its after-fork hooks, run by
    multiprocessing and billiard children). Closing a Redis channel left
    polling (an ``inspect`` that gave up before its BRPOP returned) reads that
    reply from the socket the child shares with its parent, and waits forever
    when the parent reads it first; closing an AMQP connection would end the
    parent's. Marked closed here, before any hook runs, the inherited pools are
    skipped by those hooks, and the child opens its own on first use, as
    Celery's own after-fork reset intends. (``_pool``, ``_producer_pool`` and
    ``_closed`` are Celery's and kombu's: no public API drops a pool without
    closing its connections.)
    """
    inherited = []
    for app in apps.all():
        inherited.append(app._pool)
        app._pool = None
        amqp = app.__dict__.get("amqp")  # Celery's cached property, if ever built
        if amqp is not None:
            inherited.append(amqp._producer_pool)
            amqp._producer_pool = None
    for group in (kombu_pools.connections, kombu_pools.producers):  # Celery's control uses them
        inherited.extend(group.values())
        group.clear()
    for pool in inherited:
        if pool is not None:
            pool._closed = True

_local = threading.local()


def current_alias() -> str:
    """The alias made current in this thread by :func:`using`, else ``"default"``."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else conf.DEFAULT_APP_ALIAS


@contextmanager
def using(alias: str) -> Iterator[AdvCelery]:
    """Make ``alias`` the current app for this thread only, for the block.

    Nests, and restores the previous app on exit, exceptions included. Shared
    tasks whose name has no ``TASK_APPS`` entry are sent through this app, and
    ``celery.current_app`` is this app inside the block.
    """
    app = apps[alias]
    previous_app = celery_state._tls.current_app
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(alias)
    celery_state._set_current_app(app)
    try:
        yield app
    finally:
        stack.pop()
        celery_state._set_current_app(previous_app)


def install_default_app() -> None:
    """Make the ``default`` alias Celery's fallback app (no I/O).

    Without this, a ``shared_task`` used in a thread where no app is current
    resolves to Celery's built-in fallback app, whose broker is
    ``amqp://localhost`` whatever the settings say.
    """
    if isinstance(conf.app_settings().get(conf.DEFAULT_APP_ALIAS), Mapping):
        apps[conf.DEFAULT_APP_ALIAS].set_default()
