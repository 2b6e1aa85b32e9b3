"""Tasks of mixed outcomes for the event recorder's tests (on the Redis and RabbitMQ apps)."""

import time

from django_celery_adv.registry import apps


def _define(alias: str) -> dict:
    app = apps[alias]

    @app.task(name=f"events.{alias}.work", bind=True)
    def work(self, value, seconds=0.0):
        if seconds:
            time.sleep(seconds)
        return value * 2

    @app.task(name=f"events.{alias}.fail", bind=True)
    def fail(self, value):
        raise ValueError(f"bad value {value}")

    @app.task(name=f"events.{alias}.flaky", bind=True, max_retries=1, default_retry_delay=0)
    def flaky(self, value):
        if not self.request.retries:
            raise self.retry(countdown=0)
        return value

    return {"work": work, "fail": fail, "flaky": flaky}


default = _define("default")
rabbit = _define("global")
