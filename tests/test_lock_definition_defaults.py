"""``CELERY_ADV["LOCK_DEFAULTS"]`` is the one source of a new lock definition's values.

The admin add form, ``LockDefinition.objects.create()`` and the rows the code
creates all start from the merged setting (``conf.get("LOCK_DEFAULTS")``), read
when the row or form is made, so ``override_settings`` is followed; the system
check accepts exactly the values the model's validators accept.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db.migrations.loader import MigrationLoader
from django.test import override_settings
from django.urls import reverse

from django_celery_adv import conf
from django_celery_adv.checks import check_lock_defaults
from django_celery_adv.models import LockDefault, LockDefinition

pytestmark = pytest.mark.django_db

ADD_URL = "/admin/django_celery_adv/lockdefinition/add/"
#: LOCK_DEFAULTS key -> LockDefinition field.
FIELDS = {"TTL": "ttl", "RETRY_COUNTDOWN": "retry_countdown", "RETRY_JITTER": "retry_jitter",
          "RETRY_BACKOFF": "retry_backoff", "WAIT": "wait", "MAX_RETRIES": "max_retries"}
CUSTOM = {"TTL": 5, "RETRY_COUNTDOWN": 7, "RETRY_JITTER": 0.5, "RETRY_BACKOFF": True,
          "WAIT": 2.5, "MAX_RETRIES": 3}


def lock_defaults(**values: Any) -> override_settings:
    return override_settings(CELERY_ADV={**settings.CELERY_ADV, "LOCK_DEFAULTS": values})


def add_form_value(client: Any, field: str) -> str | bool | None:
    """The value the admin add form offers for ``field`` (checkbox: checked or not)."""
    page = client.get(ADD_URL).content.decode()
    tag = re.search(rf'<input [^>]*name="{field}"[^>]*>', page)
    assert tag, f"no input named {field!r} on the add page"
    if 'type="checkbox"' in tag.group(0):
        return " checked" in tag.group(0)
    value = re.search(r'value="([^"]*)"', tag.group(0))
    return value.group(1) if value else None


def test_add_url_is_the_admin_add_view():
    assert reverse("admin:django_celery_adv_lockdefinition_add") == ADD_URL


def test_add_form_offers_the_ttl_of_the_settings(admin_client):
    with lock_defaults(TTL=5):
        assert add_form_value(admin_client, "ttl") == "5"
    with lock_defaults(TTL=90):
        assert add_form_value(admin_client, "ttl") == "90"


def test_add_form_offers_every_lock_default_of_the_settings(admin_client):
    with lock_defaults(**CUSTOM):
        offered = {key: add_form_value(admin_client, field) for key, field in FIELDS.items()}
    assert offered == {"TTL": "5", "RETRY_COUNTDOWN": "7", "RETRY_JITTER": "0.5",
                       "RETRY_BACKOFF": True, "WAIT": "2.5", "MAX_RETRIES": "3"}


def test_create_starts_from_the_settings():
    with lock_defaults(TTL=5):
        row = LockDefinition.objects.create(name="from-settings")
    row.refresh_from_db()
    assert row.ttl == 5
    # Keys the project leaves out come from conf.DEFAULTS, merged key by key.
    assert row.wait == conf.DEFAULTS["LOCK_DEFAULTS"]["WAIT"]
    with lock_defaults(**CUSTOM):
        row = LockDefinition.objects.create(name="all-from-settings")
    row.refresh_from_db()
    assert {key: getattr(row, field) for key, field in FIELDS.items()} == CUSTOM


def test_without_the_setting_new_rows_get_the_library_defaults(admin_client):
    project = {key: value for key, value in settings.CELERY_ADV.items()
               if key != "LOCK_DEFAULTS"}
    with override_settings(CELERY_ADV=project):
        row = LockDefinition.objects.create(name="library-defaults")
        ttl_offered = add_form_value(admin_client, "ttl")
    assert {key: getattr(row, field) for key, field in FIELDS.items()} == \
        conf.DEFAULTS["LOCK_DEFAULTS"]
    assert ttl_offered == str(conf.DEFAULTS["LOCK_DEFAULTS"]["TTL"])


def test_the_migrations_store_the_settings_backed_defaults():
    # The migrated state holds LockDefault('TTL')..., not numbers frozen at some release.
    state = MigrationLoader(None, ignore_no_migrations=True).project_state()
    migrated = state.models["django_celery_adv", "lockdefinition"].fields
    for key, field in FIELDS.items():
        assert migrated[field].default == LockDefault(key)
        assert migrated[field].deconstruct()[1:] == \
            LockDefinition._meta.get_field(field).deconstruct()[1:]


# -- the check accepts what the model accepts ----------------------------------------

@pytest.mark.parametrize(("key", "value"), [
    ("TTL", 1), ("TTL", 0.99), ("TTL", 0), ("TTL", 3600.5),
    ("RETRY_COUNTDOWN", 0), ("RETRY_COUNTDOWN", -0.01),
    ("RETRY_JITTER", 0), ("RETRY_JITTER", -1),
    ("WAIT", 0), ("WAIT", -0.1), ("WAIT", 12.5),
    ("MAX_RETRIES", None), ("MAX_RETRIES", 0), ("MAX_RETRIES", -1), ("MAX_RETRIES", 10),
    ("RETRY_BACKOFF", True), ("RETRY_BACKOFF", False),
])
def test_check_and_model_validators_agree(key, value):
    check_accepts = check_lock_defaults({key: value}) == []
    row = LockDefinition(name="bounds", **{FIELDS[key]: value})
    try:
        row.full_clean(exclude=["name"])
        model_accepts = True
    except ValidationError:
        model_accepts = False
    assert check_accepts == model_accepts, (key, value)
