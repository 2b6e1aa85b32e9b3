"""Routing precedence of django_celery_adv.registry, without a broker or a worker.

Which app sends a task, first rule that applies:

1. a task bound to an app (``apps[alias].task``) always goes through that app;
2. a shared task whose name matches a ``TASK_APPS`` glob (first match in the
   setting's order) goes through that alias;
3. any other shared task goes through the alias of the innermost ``using()``
   block of the calling thread, else ``default``.

``using()`` nests, restores on exit (exceptions included) and is thread-local.
Celery's own ``Task.apply_async`` is replaced by a recorder: what is asserted
is the app that would have published the message. Real publishing through
real workers is covered by tests/test_routing_workers.py.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from unittest import mock

import celery
import pytest
from celery.app.task import Task
from django.conf import settings
from django.test import override_settings

from django_celery_adv.exceptions import ImproperlyConfiguredApp
from django_celery_adv.registry import apps, current_alias, task_alias, using
from tests.testapp.tasks import build_report, shared_echo, where_default, where_global


def task_apps(mapping: dict[str, str]) -> override_settings:
    config = copy.deepcopy(settings.CELERY_ADV)
    config["TASK_APPS"] = mapping
    return override_settings(CELERY_ADV=config)


@pytest.fixture
def sent() -> Iterator[list[str]]:
    """Aliases of the apps that published, in order (nothing reaches a broker)."""
    published: list[str] = []

    def publish(task, *args, **kwargs):
        published.append(task._get_app().alias)

    with mock.patch.object(Task, "apply_async", autospec=True, side_effect=publish):
        yield published


# -- precedence --------------------------------------------------------------------

def test_a_bound_task_stays_on_its_app_whatever_task_apps_and_using_say(sent):
    with task_apps({"testapp.where_*": "twin"}), using("global"):
        where_default.delay(1)
        where_global.apply_async((2,))

    assert sent == ["default", "global"]


def test_a_task_apps_glob_beats_using(sent):
    with using("twin"):
        build_report.delay(1)  # reports.tasks.* -> global in the test settings

    assert sent == ["global"]


def test_the_first_matching_glob_wins(sent):
    with task_apps({"reports.*": "twin", "reports.tasks.*": "global"}):
        assert task_alias("reports.tasks.build") == "twin"
        build_report.delay(1)
    with task_apps({"reports.tasks.*": "global", "reports.*": "twin"}):
        build_report.delay(2)

    assert sent == ["twin", "global"]


def test_globs_match_the_whole_name_case_sensitively():
    with task_apps({"reports.tasks.*": "global"}):
        assert task_alias("reports.tasks.build") == "global"
        assert task_alias("Reports.tasks.build") is None
        assert task_alias("myreports.tasks.build") is None
        assert task_alias("reports.tasks") is None


def test_an_unmatched_shared_task_goes_through_using_else_default(sent):
    shared_echo.delay(0)
    with using("global"):
        shared_echo.delay(1)
    shared_echo.delay(2)

    assert sent == ["default", "global", "default"]


# -- using(): nesting, restoring, threads -----------------------------------------------

def test_using_nests_and_restores_the_outer_app(sent):
    assert current_alias() == "default"
    with using("twin") as twin:
        assert celery.current_app._get_current_object() is twin
        with using("global") as global_app:
            assert current_alias() == "global"
            assert celery.current_app._get_current_object() is global_app
            shared_echo.delay(1)
        assert current_alias() == "twin"
        assert celery.current_app._get_current_object() is twin
        shared_echo.delay(2)
    assert current_alias() == "default"

    assert sent == ["global", "twin"]


def test_using_restores_after_an_exception():
    before = celery.current_app._get_current_object()
    with pytest.raises(RuntimeError), using("twin"), using("global"):
        raise RuntimeError("boom")

    assert current_alias() == "default"
    assert celery.current_app._get_current_object() is before


def test_using_an_unknown_alias_raises_and_changes_nothing():
    with pytest.raises(ImproperlyConfiguredApp), using("nope"):
        pass  # pragma: no cover

    assert current_alias() == "default"


def test_using_is_local_to_its_thread(sent):
    inside, checked = threading.Event(), threading.Event()
    seen: dict[str, str] = {}

    def other_thread() -> None:
        inside.wait(5)
        seen["alias"] = current_alias()
        shared_echo.delay("other")
        checked.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with using("global"):
        inside.set()
        assert checked.wait(5)
        shared_echo.delay("main")
    thread.join(5)

    assert seen == {"alias": "default"}
    assert sent == ["default", "global"]


def test_each_alias_is_one_app_per_process():
    assert apps["global"] is apps["global"]
    assert apps["global"].alias == "global"
    with using("global") as app:
        assert app is apps["global"]
