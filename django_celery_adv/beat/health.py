"""Beat health: every beat process writes its row (:class:`~django_celery_adv.models.BeatNode`),
and anyone reads the per-app summary from the database.

Writing (:class:`HealthRecorder`, in the beat): at most once a second, and at once
when the role changes; a database error is logged and the beat goes on (health
never stops scheduling). Rows of beats unheard of for a day are pruned by leaders.

Reading (:func:`app_health`, admin and ``celery_status``): an app is healthy
when a leader row exists and its last tick is not older than 3 x its max
interval. Times are each beat host's wall clock (display and staleness only:
who leads is decided by the lease, never by these rows).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError
from django.utils import timezone
from django.utils.translation import gettext as _

from ..locks.backends.base import HOSTNAME

logger = logging.getLogger("django_celery_adv.beat")

#: A leader whose last tick is older than this many max intervals is stale.
STALE_TICKS = 3
WRITE_EVERY = 1.0
PRUNE_AFTER = timedelta(days=1)


class HealthRecorder:
    """Writes this beat process's row."""

    def __init__(self, alias: str, lock_backend: str, max_interval: float) -> None:
        self.key = {"app_alias": alias, "hostname": HOSTNAME, "pid": os.getpid()}
        self.lock_backend = lock_backend
        self.max_interval = max_interval
        self.started_at = timezone.now()
        self._written_at = float("-inf")
        self._role: str | None = None
        self._failing = False

    def record(self, *, role: str, token: int | None, since: datetime | None, lag: float,
               next_due: tuple[str, datetime] | None, sent: int) -> None:
        from ..models import BeatNode

        now = time.monotonic()
        if role == self._role and now - self._written_at < WRITE_EVERY:
            return
        values = {"role": role, "token": token, "leader_since": since,
                  "lock_backend": self.lock_backend, "max_interval": self.max_interval,
                  "started_at": self.started_at, "last_tick": timezone.now(),
                  "tick_lag": round(max(lag, 0.0), 3), "sent": sent,
                  "next_due_name": next_due[0][:200] if next_due else "",
                  "next_due_at": next_due[1] if next_due else None}
        try:
            BeatNode.objects.update_or_create(**self.key, defaults=values)
            if role == BeatNode.Role.LEADER and self._role != role:
                BeatNode.objects.filter(last_tick__lt=timezone.now() - PRUNE_AFTER).delete()
        except DatabaseError as e:
            if not self._failing:
                logger.warning("beat %s: could not record its health: %s",
                               self.key["app_alias"], e)
            self._failing = True
            return
        self._failing = False
        self._written_at, self._role = now, role

    def remove(self) -> None:
        """Forget this process's row (clean shutdown)."""
        from ..models import BeatNode

        try:
            BeatNode.objects.filter(**self.key).delete()
        except DatabaseError as e:
            logger.warning("beat %s: could not remove its health row: %s",
                           self.key["app_alias"], e)


@dataclass
class BeatProcessInfo:
    hostname: str
    pid: int
    role: str
    token: int | None
    leader_since: datetime | None
    last_tick: datetime
    tick_lag: float
    next_due_name: str
    next_due_at: datetime | None
    max_interval: float
    lock_backend: str
    sent: int
    #: Seconds since its last tick, as read now.
    age: float = 0.0
    stale: bool = False


@dataclass
class AppBeatHealth:
    alias: str
    leader: BeatProcessInfo | None = None
    standbys: list[BeatProcessInfo] = field(default_factory=list)
    #: Rows of beats that stopped ticking (dead or hung), newest first.
    gone: list[BeatProcessInfo] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return self.leader is not None and not self.leader.stale

    @property
    def problem(self) -> str:
        if self.leader is None:
            return _("no beat leader")
        if self.leader.stale:
            return _("beat leader %(host)s pid %(pid)s last ticked %(age).0f s ago") % {
                "host": self.leader.hostname, "pid": self.leader.pid, "age": self.leader.age}
        return ""

    def as_dict(self) -> dict[str, Any]:
        def node(info: BeatProcessInfo | None) -> dict[str, Any] | None:
            if info is None:
                return None
            data = asdict(info)
            for key, value in data.items():
                if isinstance(value, datetime):
                    data[key] = value.isoformat()
            return data

        return {"healthy": self.healthy, "problem": self.problem, "leader": node(self.leader),
                "standbys": [node(info) for info in self.standbys],
                "gone": [node(info) for info in self.gone]}


def app_health(aliases: list[str]) -> dict[str, AppBeatHealth]:
    """Beat health per alias, from the rows beats wrote (``DatabaseError`` propagates)."""
    from ..models import BeatNode

    now = timezone.now()
    result = {alias: AppBeatHealth(alias) for alias in aliases}
    for row in BeatNode.objects.filter(app_alias__in=aliases).order_by("-last_tick"):
        age = (now - row.last_tick).total_seconds()
        info = BeatProcessInfo(
            hostname=row.hostname, pid=row.pid, role=row.role, token=row.token,
            leader_since=row.leader_since, last_tick=row.last_tick, tick_lag=row.tick_lag,
            next_due_name=row.next_due_name, next_due_at=row.next_due_at,
            max_interval=row.max_interval, lock_backend=row.lock_backend, sent=row.sent,
            age=round(age, 3), stale=age > STALE_TICKS * max(row.max_interval, 1.0))
        health = result[row.app_alias]
        if row.role == BeatNode.Role.LEADER and health.leader is None:
            health.leader = info  # the newest leader row; older ones are past leaders
        elif info.stale:
            health.gone.append(info)
        elif row.role == BeatNode.Role.STANDBY:
            health.standbys.append(info)
        else:
            health.gone.append(info)  # an older leader row: a past leader (killed, or hung)
    return result
