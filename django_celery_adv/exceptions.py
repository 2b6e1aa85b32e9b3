"""The library's one exception family; client errors are chained with ``from``."""

from __future__ import annotations


class CeleryAdvError(Exception):
    """Base of every error this library raises."""


class ImproperlyConfiguredApp(CeleryAdvError, KeyError):
    """An alias that ``CELERY_ADV["APPS"]`` does not define."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class InvalidLockBackendError(CeleryAdvError):
    """A ``LOCK_BACKENDS`` entry that cannot be loaded or is unknown."""


class LockError(CeleryAdvError):
    """A lock server failed or could not be reached; the operation may be retried."""


class LockUnavailable(CeleryAdvError):
    """No slot of the lock was free (after the lock's own retries, if any)."""


class BrokerError(CeleryAdvError):
    """A broker failed, refused or timed out; the message is masked and readable."""
