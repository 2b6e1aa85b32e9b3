"""The admin of django-celery-adv, one module per area.

* :mod:`.locks`: lock definitions (tune, see holders, force-release);
* :mod:`.failures`: task-failure groups (browse, chart, resolve);
* :mod:`.monitoring`: the workers and lock-holders pages.

Importing the package registers all three on the default admin site (Django's
``autodiscover`` imports it). The areas import the domain modules below them
(``locks``, ``failures``, ``monitoring``); ``monitoring`` reuses the lock
area's holder reading, nothing imports ``monitoring``, so there is no cycle.
"""

from . import beat, failures, locks, monitoring, tasks  # noqa: F401  (tasks: the Tasks page)

__all__ = ["beat", "failures", "locks", "monitoring"]
