"""Public lock API: ``locked``, ``LockedTask``, ``lock``, ``holders``, ``force_release``,
``Lease``, ``LockUnavailable``."""

from ..exceptions import LockError, LockUnavailable
from .api import current_lease, lock
from .backends.base import Holder, Lease
from .operations import force_release, holders
from .tasks import LockedTask, locked

__all__ = ["Holder", "Lease", "LockError", "LockUnavailable", "LockedTask", "current_lease",
           "force_release", "holders", "lock", "locked"]
