"""Lock backends by alias, built from ``CELERY_ADV["LOCK_BACKENDS"]`` like ``caches``.

One instance per alias per process; instances are dropped in a forked child
so that every prefork worker process opens its own client connections.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from django.utils.module_loading import import_string

from ... import conf
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


class LockBackendRegistry(Mapping[str, LockBackend]):
    def __init__(self) -> None:
        self._backends: dict[str, LockBackend] = {}
        self._lock = threading.Lock()

    def __getitem__(self, alias: str) -> LockBackend:
        try:
            return self._backends[alias]
        except KeyError:
            pass
        with self._lock:
            if alias not in self._backends:
                settings = conf.lock_backend_settings()
                if alias not in settings:
                    raise InvalidLockBackendError(
                        f"No lock backend {alias!r} in CELERY_ADV['LOCK_BACKENDS'] "
                        f"(configured: {', '.join(sorted(settings)) or 'none'})."
                    )
                self._backends[alias] = create_backend(alias, settings[alias])
            return self._backends[alias]

    def __iter__(self) -> Iterator[str]:
        return iter(conf.lock_backend_settings())

    def __len__(self) -> int:
        return len(conf.lock_backend_settings())

    def reset(self) -> None:
        """Close and forget every backend (settings changed, tests)."""
        with self._lock:
            backends, self._backends = self._backends, {}
        for backend in backends.values():
            backend.close()

    def forget_after_fork(self) -> None:
        # The parent's sockets must not be shared with the child: drop them
        # without closing (closing could tear down the parent's sessions).
        self._backends = {}
        self._lock = threading.Lock()


lock_backends = LockBackendRegistry()
os.register_at_fork(after_in_child=lock_backends.forget_after_fork)
