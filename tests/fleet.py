"""Simulated fleets for the tests: :class:`bench.fleet.Fleet` on an app of the registry.

``with simulated_fleet("default", 500, latency="const:0.002") as fleet:`` starts
one subprocess answering the control protocol as 500 workers of the
``default`` app (its broker, control and event exchanges, transport
options), returns once they answer, and stops it on exit; ``fleet.hostnames``
lists them (``sim-<i>@<host>`` unless ``prefix=`` says otherwise) and
``fleet.stop()`` returns its counters (requests, replies, lag behind the
latency schedule). :func:`started_fleets` starts any number of them and
stops them together (a fixture in three lines). The simulator's log goes under the test build
folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from django.conf import settings

from bench.fleet import Fleet

LOG_DIR = Path(settings.BUILD_DIR) / "logs"


def make_fleet(alias: str, workers: int, *, latency: str = "const:0.001",
               **options: Any) -> Fleet:
    """A (not yet started) simulated fleet of ``workers`` on app ``alias``."""
    from django_celery_adv.registry import apps

    LOG_DIR.mkdir(parents=True, exist_ok=True)
    prefix = options.setdefault("prefix", "sim")
    options.setdefault("log_path", LOG_DIR / f"fleet-{alias}-{prefix}-{os.getpid()}.log")
    return Fleet.for_app(apps[alias], workers, latency=latency, **options)


@contextmanager
def simulated_fleet(alias: str, workers: int, *, latency: str = "const:0.001",
                    **options: Any) -> Iterator[Fleet]:
    """Run a simulated fleet for the length of the ``with`` block."""
    fleet = make_fleet(alias, workers, latency=latency, **options)
    with fleet:
        yield fleet


@contextmanager
def started_fleets() -> Iterator[Callable[..., Fleet]]:
    """``start(alias, n, **options)`` starts a fleet; all are stopped on exit.

    A test module makes it a fixture in three lines::

        @pytest.fixture
        def fleets():
            with started_fleets() as start:
                yield start
    """
    started: list[Fleet] = []

    def start(alias: str, workers: int, **options: Any) -> Fleet:
        fleet = make_fleet(alias, workers, **options)
        started.append(fleet)
        return fleet.start()

    try:
        yield start
    finally:
        for fleet in started:
            fleet.stop()
