"""The seed's examples: a task on each of two apps, a routed shared task, two locks."""

import socket
import time

from celery import shared_task

from django_celery_adv.locks import LockedTask, current_lease, lock, locked
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


@apps["default"].task(name="demo.tasks.save_to_storage", bind=True)
@locked("save-to-storage-task", 10)
def save_to_storage(self, data: str) -> dict:
    """The seed's semaphore: at most 10 at once (the admin row can change that)."""
    time.sleep(2)
    lease = current_lease()
    return {"data": data, "slot": lease.slot, "fencing_token": lease.token}


class ImportDataTask(LockedTask):
    """The seed's mutex: a second import while one runs is dropped, not queued."""

    name = "demo.tasks.import_data"
    lock_name = "import-data"
    retry_on_lock = False

    def locked_run(self, url: str) -> str:
        time.sleep(5)
        return f"imported {url}"


import_data = apps["default"].register_task(ImportDataTask())


@apps["global"].task(name="demo.tasks.nightly_report")
def nightly_report() -> str:
    """Any code can take a lock: here the mutex keeps two reports from overlapping."""
    with lock("nightly-report", blocking=False) as lease:
        time.sleep(1)
        return f"report written with fencing token {lease.token}"


def parse_amount(text: str) -> int:
    """Where the demo's bug lives: the innermost project frame of its failures."""
    return int(text.replace(",", ""))


@apps["default"].task(name="demo.tasks.charge_invoice")
def charge_invoice(invoice_id: int, amount: str, api_token: str = "") -> int:
    """Fails on purpose for amounts like "12.50": one group under Celery > Task failures.

    ``api_token`` shows the masking: the admin shows it as ``****``.
    """
    return parse_amount(amount)
