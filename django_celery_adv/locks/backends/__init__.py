"""Lock backends by alias, built from ``CELERY_ADV["LOCK_BACKENDS"]`` like ``caches``.

One instance per alias per process (see :mod:`django_celery_adv.aliases`); a
backend keeps its client connections in a ``PerProcess``, so every prefork
worker process opens its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.utils.module_loading import import_string

from ... import conf
from ...aliases import AliasRegistry
from ...exceptions import InvalidLockBackendError
from .base import LockBackend

#: pip extra that provides the client library of each bundled backend module.
BUILTIN_EXTRAS = {
    "django_celery_adv.locks.backends.redis": "redis",
    "django_celery_adv.locks.backends.zookeeper": "zookeeper",
    "django_celery_adv.locks.backends.etcd": "etcd",
    "django_celery_adv.locks.backends.mongodb": "mongodb",
}


def pip_extra_for(dotted_path: str) -> str | None:
    """The extra to install for a bundled backend's client library, if any."""
    module = dotted_path.rpartition(".")[0]
    return BUILTIN_EXTRAS.get(module)


def load_backend_class(dotted_path: str) -> type[LockBackend]:
    try:
        backend_cls = import_string(dotted_path)
    except ImportError as e:
        raise InvalidLockBackendError(f"Could not import {dotted_path!r}: {e}") from e
    if not (isinstance(backend_cls, type) and issubclass(backend_cls, LockBackend)):
        raise InvalidLockBackendError(f"{dotted_path!r} is not a LockBackend subclass.")
    return backend_cls


def create_backend(alias: str, params: Mapping[str, Any]) -> LockBackend:
    backend_cls = load_backend_class(params["BACKEND"])
    return backend_cls(alias, params.get("OPTIONS") or {})


class LockBackendRegistry(AliasRegistry[LockBackend]):
    """alias -> lock backend, built lazily; each backend keeps its own
    per-process clients, so an instance may be shared across a fork."""

    kind = "lock backend"
    setting_key = "LOCK_BACKENDS"

    def configured(self) -> Mapping[str, Mapping[str, Any]]:
        return conf.lock_backend_settings()

    def create(self, alias: str, params: Mapping[str, Any]) -> LockBackend:
        return create_backend(alias, params)

    def unknown(self, message: str) -> Exception:
        return InvalidLockBackendError(message)

    def close_instance(self, instance: LockBackend) -> None:
        instance.close()


lock_backends = LockBackendRegistry()
