"""Beat settings of one app: ``CELERY_ADV["BEAT"]`` merged over the defaults in
:mod:`django_celery_adv.conf`, then that app's ``BEAT["APPS"][alias]`` overrides.

Reading never raises on a malformed value (the system checks E020-E029 name
it): a value of the wrong shape falls back to the library default.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import conf

#: Keys an app may override in ``BEAT["APPS"][alias]``.
APP_KEYS = ("LOCK_BACKEND", "TTL", "MISFIRE_GRACE", "ON_BUSY")
ON_BUSY_CHOICES = ("skip", "send")


@dataclass(frozen=True)
class BeatSettings:
    alias: str
    lock_backend: str
    #: Seconds the leadership lease lives without a renewal.
    ttl: float
    #: None: a run missed during a failover is sent once, however late; a number
    #: (or a {periodic task name glob: seconds} dict): a run later than that is skipped.
    misfire_grace: float | Mapping[str, float] | None
    #: A locked periodic task whose lock is full at its due time: "skip" or "send"
    #: (a lock definition's ``beat_on_busy``, when set, wins over this).
    on_busy: str

    @property
    def lock_name(self) -> str:
        """The leadership lease: one per app, capacity 1."""
        return f"beat.{self.alias}"

    @property
    def max_interval(self) -> float:
        """The longest a beat sleeps: well below TTL/3, so a live leader renews
        at least three times per TTL whatever ``beat_max_loop_interval`` says."""
        return self.ttl / 4

    @property
    def margin(self) -> float:
        """A leader sends only while its lease has more than this left (its own clock)."""
        return self.ttl / 5

    @property
    def renew_every(self) -> float:
        return self.ttl / 10

    def grace_for(self, entry_name: str) -> float | None:
        grace = self.misfire_grace
        if isinstance(grace, Mapping):
            for pattern, seconds in grace.items():
                if fnmatch.fnmatchcase(entry_name, pattern):
                    return seconds
            return None
        return grace


def raw_settings() -> dict[str, Any]:
    """``BEAT`` as written over the defaults (non-dicts fall back to the defaults)."""
    defaults = conf.DEFAULTS["BEAT"]
    value = conf.get("BEAT")
    return {**defaults, **value} if isinstance(value, dict) else dict(defaults)


def beat_settings(alias: str) -> BeatSettings:
    """The beat settings of app ``alias``."""
    defaults = conf.DEFAULTS["BEAT"]
    merged = raw_settings()
    per_app = merged.get("APPS")
    overrides = per_app.get(alias) if isinstance(per_app, dict) else None
    if isinstance(overrides, dict):
        merged.update({key: overrides[key] for key in APP_KEYS if key in overrides})
    ttl = merged["TTL"]
    if not (isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0):
        ttl = defaults["TTL"]
    on_busy = merged["ON_BUSY"] if merged["ON_BUSY"] in ON_BUSY_CHOICES else defaults["ON_BUSY"]
    return BeatSettings(alias=alias, lock_backend=str(merged["LOCK_BACKEND"]), ttl=float(ttl),
                        misfire_grace=merged["MISFIRE_GRACE"], on_busy=on_busy)
