"""One base for the mappings ``alias -> object`` built from a ``CELERY_ADV`` dict:
``registry.apps`` (Celery apps) and ``locks.backends.lock_backends``.

Shaped like Django's ``BaseConnectionHandler`` (``caches``, ``connections``):
an object is built on first access from its alias's settings and kept for the
life of the process. Unlike Django's, instances are shared by every thread
of a process (Celery apps and lock backends are thread-safe), and per-process
resources (sockets) live inside the objects (see :mod:`.process`).

Guarantees:

* one instance per alias per process, built at most once even under threads;
* on ``setting_changed`` for ``CELERY_ADV`` (``override_settings`` in tests),
  every instance whose alias's settings changed or vanished is dropped (and
  closed), so the next access builds it from the new settings; instances whose
  settings are unchanged are kept, so objects bound to them (tasks registered
  on an app) stay valid.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

from django.core.signals import setting_changed

from . import conf
from .process import ForkSafeLock

T = TypeVar("T")


class AliasRegistry(Mapping[str, T], Generic[T], abc.ABC):
    """``registry[alias]`` builds lazily from ``configured()[alias]``."""

    #: What the objects are, for error messages ("Celery app").
    kind = "object"
    #: The ``CELERY_ADV`` key that configures them ("APPS").
    setting_key = ""

    def __init__(self) -> None:
        self._built: dict[str, tuple[Any, T]] = {}
        self._lock = ForkSafeLock()
        setting_changed.connect(self._settings_changed, weak=False)

    @abc.abstractmethod
    def configured(self) -> Mapping[str, Any]:
        """alias -> its settings, as :mod:`.conf` reads them."""

    @abc.abstractmethod
    def create(self, alias: str, params: Any) -> T:
        """Build the object of ``alias`` (no I/O)."""

    @abc.abstractmethod
    def unknown(self, message: str) -> Exception:
        """The error raised for an alias that the settings do not define."""

    def close_instance(self, instance: T) -> None:
        """Release what an instance holds when it is dropped."""

    def __getitem__(self, alias: str) -> T:
        built = self._built.get(alias)
        if built is not None:
            return built[1]
        with self._lock:
            if alias not in self._built:
                configured = self.configured()
                if alias not in configured:
                    raise self.unknown(
                        f"No {self.kind} {alias!r} in CELERY_ADV[{self.setting_key!r}] "
                        f"(configured: {', '.join(sorted(configured)) or 'none'}).")
                params = configured[alias]
                self._built[alias] = (copy.deepcopy(params), self.create(alias, params))
            return self._built[alias][1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.configured())

    def __len__(self) -> int:
        return len(self.configured())

    def all(self) -> list[T]:
        return [self[alias] for alias in self]

    def reset(self) -> None:
        """Close and forget every instance (tests, shutdown)."""
        self._drop(lambda alias, params: True)

    def _settings_changed(self, *, setting: str, **kwargs: Any) -> None:
        if setting == conf.SETTING_NAME:
            configured = self.configured()
            self._drop(lambda alias, params: configured.get(alias) != params)

    def _drop(self, stale) -> None:
        with self._lock:
            dropped = [instance for alias, (params, instance) in self._built.items()
                       if stale(alias, params)]
            self._built = {alias: built for alias, built in self._built.items()
                           if not stale(alias, built[0])}
        for instance in dropped:
            self.close_instance(instance)
