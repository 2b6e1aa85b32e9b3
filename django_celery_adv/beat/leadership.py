"""Leadership of one app's beats: a capacity-1 lease ``beat.<alias>`` on a lock backend.

Every beat of an app calls :meth:`Leadership.refresh` at each tick: the leader
renews its lease (at most every TTL/10), a standby tries to take it.
:meth:`Leadership.may_send` is the fence a beat checks immediately before
each send.

Guarantees:

* at most one beat of an app sends at a time, as far as the lock backend keeps
  capacity 1 (see ``locks/backends/base.py``) and the leader is not paused
  between its fence check and the send; the lease's fencing token rides on
  every message (``x-beat-token``) so a consumer can reject a stale leader;
* the fence is the lease's own validity by the local monotonic clock, with a
  margin (TTL/5): a leader paused or cut off past its lease does not send
  after it wakes, before it has even asked the server;
* an error while taking or renewing the lease is never a success: a failed
  take leaves this beat a standby; a renewal that fails stops all sends at
  once, is retried at the next ticks while the lease is still valid, and the
  beat steps down when the lease runs out or the backend says it was lost.
  Nothing here raises: the beat never exits or crash-loops over its lease;
* renewal runs in the scheduler's own thread, not in a heartbeat thread, so a
  scheduler that hangs loses the lease and a standby takes over within TTL +
  one tick.

Error handling: ``LockError`` (a server fault) is logged at WARNING once per
failure streak; any other exception is a bug, logged with its traceback; both
count as "not granted" / "not renewed".
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

from ..exceptions import LockError
from ..locks.backends import lock_backends
from ..locks.backends.base import Holder, Lease, LockBackend, utcnow
from .config import BeatSettings

logger = logging.getLogger("django_celery_adv.beat")


class Leadership:
    """This process's claim on leading the beats of one app."""

    def __init__(self, settings: BeatSettings) -> None:
        self.settings = settings
        self.lease: Lease | None = None
        #: Wall-clock time this process became leader (display only).
        self.since: datetime | None = None
        self.renewal_failing = False
        self._renewed_at = float("-inf")
        self._failing_since: str | None = None

    @property
    def backend(self) -> LockBackend:
        return lock_backends[self.settings.lock_backend]

    @property
    def leading(self) -> bool:
        """Holds a lease whose last renewal did not fail (it may still have expired)."""
        return self.lease is not None and not self.renewal_failing

    @property
    def token(self) -> int | None:
        return self.lease.token if self.lease is not None else None

    def may_send(self) -> bool:
        """The fence: True only while the lease is ours, its last renewal succeeded
        and it has more than the margin left by this process's monotonic clock."""
        lease = self.lease
        return (lease is not None and not self.renewal_failing and not lease.lost
                and lease.remaining() > self.settings.margin)

    def refresh(self) -> None:
        """Renew the lease if held (stepping down if it is gone), else try to take it."""
        if self.lease is not None:
            self._keep(self.lease)
        if self.lease is None:
            self._take()

    def release(self) -> None:
        """Give the lease back (clean shutdown: a standby takes over at its next tick)."""
        lease, self.lease = self.lease, None
        if lease is not None and not lease.lost:
            try:
                self.backend.release(lease)
            except Exception as e:  # the lease expires on its own within its TTL
                logger.warning("beat %s: could not release %s: %s", self.settings.alias,
                               self.settings.lock_name, e)

    def _keep(self, lease: Lease) -> None:
        if lease.lost or not lease.is_valid():
            self._step_down("its lease expired before a renewal succeeded")
            return
        if time.monotonic() - self._renewed_at < self.settings.renew_every:
            return
        sent_at = time.monotonic()
        try:
            renewed = self.backend.renew(lease)
        except Exception as e:
            self.renewal_failing = True
            self._failed("renew", e)
            return
        if not renewed:
            self._step_down("the lock backend reports its lease lost")
            return
        if self.renewal_failing:
            logger.warning("beat %s: renewal works again; sending again (token %s)",
                           self.settings.alias, lease.token)
        self.renewal_failing = False
        self._failing_since = None
        self._renewed_at = sent_at

    def _take(self) -> None:
        sent_at = time.monotonic()
        try:
            lease = self.backend.acquire(self.settings.lock_name, 1, Holder(), self.settings.ttl)
        except Exception as e:
            self._failed("take", e)
            return
        self._failing_since = None
        if lease is None:
            return
        self.lease, self.since, self._renewed_at = lease, utcnow(), sent_at
        self.renewal_failing = False
        logger.info("beat %s: leading (lease %s on %r, token %s, TTL %.1f s)",
                    self.settings.alias, self.settings.lock_name, self.settings.lock_backend,
                    lease.token, self.settings.ttl)

    def _step_down(self, why: str) -> None:
        token = self.token
        self.release()
        self.since = None
        self.renewal_failing = False
        logger.warning("beat %s: no longer leading (token %s): %s; standing by",
                       self.settings.alias, token, why)

    def _failed(self, action: str, error: Exception) -> None:
        if self._failing_since == action:
            return  # logged once per failure streak
        self._failing_since = action
        what = "not sending until a renewal succeeds" if action == "renew" else "standing by"
        if isinstance(error, LockError):
            logger.warning("beat %s: could not %s lease %s: %s; %s", self.settings.alias,
                           action, self.settings.lock_name, error, what)
        else:
            logger.error("beat %s: could not %s lease %s; %s", self.settings.alias, action,
                         self.settings.lock_name, what, exc_info=error)
