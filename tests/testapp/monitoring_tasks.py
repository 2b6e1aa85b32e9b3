"""Tasks the monitoring tests watch while they run."""

import time

from django_celery_adv.registry import apps

__all__ = ["monitored_sleep"]


@apps["default"].task(name="testapp.monitored_sleep", bind=True)
def monitored_sleep(self, seconds, **options):
    """Sit in a worker for ``seconds`` so ``active`` can see it; kwargs are shown masked."""
    time.sleep(seconds)
    return {"hostname": self.request.hostname}
