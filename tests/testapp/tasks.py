"""Tasks the worker processes of the test suite run."""

import os

from celery import shared_task

from django_celery_adv.locks import LockedTask, current_lease, lock, locked
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


# -- the seed's two lock examples, instrumented with an independent counter ------

def _redis():
    import redis
    from django.conf import settings

    return redis.Redis.from_url(settings.REDIS_URL)


def observe(key: str, seconds: float) -> int:
    """Count concurrent runs in Redis (outside the lock code); returns the peak seen."""
    import time

    client = _redis()
    now = client.incr(f"{key}:running")
    client.rpush(f"{key}:observed", now)
    try:
        time.sleep(seconds)
    finally:
        client.decr(f"{key}:running")
    return now


@apps["default"].task(name="testapp.save_to_storage", bind=True)
@locked("test-save-to-storage", 2)
def save_to_storage(self, data):
    """Capacity-2 semaphore: never more than 2 at once."""
    observe("save_to_storage", 0.4)
    lease = current_lease()
    return {"data": data, "token": lease.token, "slot": lease.slot}


class ImportDataTask(LockedTask):
    """Mutex that drops a duplicate call instead of retrying it."""

    name = "testapp.import_data"
    lock_name = "test-import-data"
    retry_on_lock = False

    def locked_run(self, url):
        _redis().rpush("import_data:runs", url)
        observe("import_data", 1.5)
        return url


import_data = apps["default"].register_task(ImportDataTask())


@apps["default"].task(name="testapp.hold_lock", bind=True)
def hold_lock(self, name, seconds):
    """Take ``name`` (its admin row picks backend and TTL) and sit on it."""
    import time

    with lock(name) as lease:
        _redis().set(f"hold_lock:{name}", lease.token)
        time.sleep(seconds)
        return lease.token


@apps["default"].task(name="testapp.locked_sleep", bind=True)
def locked_sleep(self, name, seconds):
    """For the makespan benchmark: sleep holding a slot of ``name``."""
    import time

    from django_celery_adv.locks.tasks import run_locked

    return run_locked(self, name, 4, lambda: time.sleep(seconds))


from tests.testapp import event_tasks, failing_tasks  # noqa: E402,F401
from tests.testapp.monitoring_tasks import *  # noqa: E402,F403
