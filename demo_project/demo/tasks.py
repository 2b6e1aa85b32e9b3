"""The seed's examples: a task on each of two apps, and a routed shared task."""

import socket

from celery import shared_task

from django_celery_adv.registry import apps


@apps["default"].task(name="demo.tasks.add")
def add(x: int, y: int) -> int:
    """Runs on the ``default`` app's workers only."""
    return x + y


@apps["global"].task(name="demo.tasks.collect_stats", bind=True)
def collect_stats(self) -> dict:
    """Runs on the ``global`` app's workers only."""
    return {"app": self.app.main, "hostname": self.request.hostname, "host": socket.gethostname()}


@shared_task(name="demo.reports.build_report", bind=True)
def build_report(self, month: str) -> str:
    """A shared task: ``TASK_APPS`` sends it to ``global`` from any thread."""
    return f"report {month} built by {self.request.hostname}"
