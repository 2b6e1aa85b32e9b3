"""Tasks of the logging and failure-analytics tests: they log, fail and retry on purpose."""

import json
import logging

from celery import shared_task
from celery.utils.log import get_task_logger

from django_celery_adv.registry import apps

task_logger = get_task_logger(__name__)
plain_logger = logging.getLogger("testapp.plain")  # not an ancestor of the task logger


@shared_task(name="testapp.log_line", bind=True)
def log_line(self, marker):
    """Log ``marker`` through a task logger and a plain one; shared, so any app runs it."""
    task_logger.info("task line %s", marker)
    plain_logger.warning("plain line %s", marker)
    return self.request.id


def explode(kind, value):
    """The one place the failing tasks fail: their innermost project frame."""
    if kind == "key":
        raise KeyError(value)
    raise ValueError(f"bad value {value!r}")


@apps["default"].task(name="testapp.fail_with")
def fail_with(kind, value, **options):
    """Fails with ValueError (``kind="value"``) or KeyError (``kind="key"``)."""
    explode(kind, value)


@apps["default"].task(name="testapp.fail_in_stdlib")
def fail_in_stdlib(text):
    """Fails inside the standard library (json): the task itself is the project frame."""
    return json.loads(text)


@apps["default"].task(name="testapp.retry_until_exhausted", bind=True, max_retries=2)
def retry_until_exhausted(self, value):
    """Retries twice at once, then fails with the ConnectionError it retried on."""
    raise self.retry(exc=ConnectionError(f"upstream down for {value}"), countdown=0)
