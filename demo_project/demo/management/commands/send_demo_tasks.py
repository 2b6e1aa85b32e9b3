"""Send the demo's tasks and print where each ran: the routing made visible.

Every line names the worker that ran the task: the demo apps keep extended
results (``result_extended``), whose metadata carry the worker's name.
"""

from __future__ import annotations

import time

from celery.result import AsyncResult
from django.core.management.base import BaseCommand

from demo_project.demo import tasks
from django_celery_adv.registry import using

DROPPED = "import_data() again at once (the mutex is held)"


class Command(BaseCommand):
    help = "Send one of each demo task and print each result and the worker that ran it."

    def add_arguments(self, parser):
        parser.add_argument("--timeout", type=float, default=30.0)

    def handle(self, *args, timeout: float, **options):
        sent = {
            "add(2, 3) on 'default'": tasks.add.delay(2, 3),
            "collect_stats() on 'global'": tasks.collect_stats.delay(),
            "shared build_report() routed by TASK_APPS": tasks.build_report.delay("2026-11"),
        }
        with using("default"):  # TASK_APPS still wins over using()
            sent["build_report() inside using('default')"] = tasks.build_report.delay("2026-12")
        sent["save_to_storage() under the capacity-10 semaphore"] = \
            tasks.save_to_storage.delay("hello")
        first = sent["import_data() (mutex)"] = tasks.import_data.delay("https://example.com/feed")
        # The second import must reach a worker while the first holds the mutex;
        # sent together, a busy worker could run them in either order.
        self.wait_until_started(first, timeout)
        sent[DROPPED] = tasks.import_data.delay("https://example.com/feed")
        sent["nightly_report() with lock()"] = tasks.nightly_report.delay()
        for invoice_id, amount in enumerate(["12.50", "7.99", "1,000.00"], start=1):
            sent[f"charge_invoice({invoice_id}, {amount!r}) fails on purpose"] = \
                tasks.charge_invoice.delay(invoice_id, amount, api_token="demo-secret")
        for label, result in sent.items():
            self.stdout.write(f"{label}: {self.outcome(label, result, timeout)}"
                              f"  [ran on {result.worker or 'an unknown worker'}]")

    @staticmethod
    def wait_until_started(result: AsyncResult, timeout: float) -> None:
        """Wait for ``STARTED`` (the demo apps track it) or a final state."""
        deadline = time.monotonic() + timeout
        while result.state == "PENDING" and time.monotonic() < deadline:
            time.sleep(0.05)

    def outcome(self, label: str, result: AsyncResult, timeout: float) -> str:
        try:
            value = result.get(timeout=timeout)
        except Exception as e:  # a failed task re-raises its error here: show its class
            if not result.failed():  # a timeout or a broker error is not the demo's
                raise
            return self.style.ERROR(f"failed with {type(e).__name__} "
                                    "(see Celery > Task failures in the admin)")
        if value is None and label == DROPPED:
            return "dropped, not queued (LockedTask with retry_on_lock = False)"
        return str(value)
