"""Entry point that hands one registry app to Celery's own command line.

Celery's ``-A`` option takes an import path, not an object. ``manage.py celery
<alias> ...`` puts the alias in ``CELERY_ADV_APP`` and passes
``-A django_celery_adv.cli:app``; the attribute is resolved here on access.
The variable survives ``exec`` so child processes resolve the same app.
"""

from __future__ import annotations

import os
from typing import Any

ALIAS_ENV = "CELERY_ADV_APP"


def __getattr__(name: str) -> Any:
    if name == "app":
        from .conf import DEFAULT_APP_ALIAS
        from .registry import apps

        return apps[os.environ.get(ALIAS_ENV, DEFAULT_APP_ALIAS)]
    raise AttributeError(name)
