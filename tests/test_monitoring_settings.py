"""MONITORING settings: defaults merged key by key, and checks E017/E018 for bad values."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.test import override_settings

from django_celery_adv import conf
from django_celery_adv.checks import check_celery_adv_settings


def ids_for(monitoring) -> list[str]:
    with override_settings(CELERY_ADV={**settings.CELERY_ADV, "MONITORING": monitoring}):
        return [message.id.rpartition(".")[2] for message in check_celery_adv_settings()]


def test_one_key_overrides_its_default_only():
    with override_settings(CELERY_ADV={**settings.CELERY_ADV,
                                       "MONITORING": {"SILENT_WINDOW": 5}}):
        assert conf.monitoring("SILENT_WINDOW") == 5
        assert conf.monitoring("READING_MAX_AGE") == conf.DEFAULTS["MONITORING"][
            "READING_MAX_AGE"]
    assert ids_for({}) == []


@pytest.mark.parametrize(("value", "expected"), [
    ("fast", ["E017"]),
    ({"SILENT_WINDOWS": 5}, ["E017"]),
    ({"READING_MAX_AGE": -1}, ["E018"]),
    ({"NEWCOMER_GRACE": True}, ["E018"]),
    ({"NEWCOMER_GRACE": 5}, ["E018"]),
    ({"PAGE_SIZE": 5}, ["E018"]),
    ({"PAGE_SIZE": 50.5}, ["E018"]),
    ({"SILENT_WINDOW": 1000, "FORGET_AFTER": 900}, ["E018"]),
    ({"OFFLINE_AFTER": 10, "FORGET_AFTER": 5, "SILENT_WINDOW": 1}, ["E018"]),
])
def test_bad_values_are_check_errors_and_fall_back_to_defaults(value, expected):
    assert ids_for(value) == expected
    with override_settings(CELERY_ADV={**settings.CELERY_ADV, "MONITORING": value}):
        if isinstance(value, dict) and value.get("READING_MAX_AGE") == -1:
            assert conf.monitoring("READING_MAX_AGE") == 3.0  # never a negative age
