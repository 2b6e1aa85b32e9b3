"""Public lock API: ``locked``, ``LockedTask``, ``lock``, ``Lease``, ``LockUnavailable``."""

from ..exceptions import LockError, LockUnavailable
from .api import current_lease, lock
from .backends.base import Holder, Lease
from .tasks import LockedTask, locked

__all__ = ["Holder", "Lease", "LockError", "LockUnavailable", "LockedTask", "current_lease",
           "lock", "locked"]
