"""``tests.settings`` for worker processes whose logging or failure recording differ.

Chosen by environment variables, so one test can point a worker at its own
UDP port or file:

``TEST_LOGGING``
    unset: ``LOGGING`` stays ``None`` (Celery's own setup);
    ``syslog``: the global ``LOGGING`` sends everything to syslog over UDP at
    127.0.0.1:``TEST_SYSLOG_PORT``;
    ``syslog-twin``: only the ``twin`` app does so, in JSON, through its own
    ``APPS["twin"]["LOGGING"]`` key; the global value stays ``None``;
    ``hook``: ``LOGGING`` is the dotted path of :func:`recording_hook`.
``TEST_HOOK_RECORD`` / ``TEST_HOOK_RAISE``
    where :func:`recording_hook` writes the arguments it got; ``1``: it raises.
``TEST_FAILURE_DB=down``
    the database is a PostgreSQL server that is not there: recording fails.
"""

import copy
import json
import os

from django_celery_adv.logconfig import syslog_logging
from tests.settings import *  # noqa: F403
from tests.settings import CELERY_ADV as BASE_CELERY_ADV

CELERY_ADV = copy.deepcopy(BASE_CELERY_ADV)

_logging = os.environ.get("TEST_LOGGING", "")
_syslog_address = ("127.0.0.1", int(os.environ.get("TEST_SYSLOG_PORT", "514")))
if _logging == "syslog":
    CELERY_ADV["LOGGING"] = syslog_logging(_syslog_address, facility="local0")
elif _logging == "syslog-twin":
    CELERY_ADV["APPS"]["twin"]["LOGGING"] = syslog_logging(_syslog_address, json=True)
elif _logging == "hook":
    CELERY_ADV["LOGGING"] = "tests.logging_settings.recording_hook"
elif _logging:
    raise RuntimeError(f"unknown TEST_LOGGING {_logging!r}")


class HookExploded(RuntimeError):
    pass


def recording_hook(**arguments):
    """A LOGGING hook that writes down its arguments, then raises if asked to."""
    with open(os.environ["TEST_HOOK_RECORD"], "w") as record:
        json.dump(arguments, record)
    if os.environ.get("TEST_HOOK_RAISE") == "1":
        raise HookExploded("hook exploded on purpose")


if os.environ.get("TEST_FAILURE_DB") == "down":
    DATABASES = {"default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "nowhere", "HOST": "127.0.0.1", "PORT": "9", "USER": "postgres",
        "OPTIONS": {"connect_timeout": 2},
    }}
