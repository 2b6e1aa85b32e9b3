"""Tasks the worker processes of the test suite run."""

import os

from celery import shared_task

from django_celery_adv.registry import apps


@apps["default"].task(name="testapp.where_default", bind=True)
def where_default(self, value):
    """Bound to ``default``: returns who ran it."""
    return {"value": value, "hostname": self.request.hostname, "pid": os.getpid()}


@apps["global"].task(name="testapp.where_global", bind=True)
def where_global(self, value):
    """Bound to ``global``: returns who ran it."""
    return {"value": value, "hostname": self.request.hostname, "pid": os.getpid()}


@apps["twin"].task(name="testapp.where_twin", bind=True)
def where_twin(self, value):
    """Bound to ``twin`` (same Redis database as ``default``)."""
    return {"value": value, "hostname": self.request.hostname, "pid": os.getpid()}


@shared_task(name="reports.tasks.build", bind=True)
def build_report(self, value):
    """Shared; TASK_APPS routes ``reports.tasks.*`` to ``global``."""
    return {"value": value, "hostname": self.request.hostname}


@shared_task(name="testapp.shared_echo", bind=True)
def shared_echo(self, value):
    """Shared with no TASK_APPS entry: goes to using()'s app, else default."""
    return {"value": value, "hostname": self.request.hostname}
