"""Two apps on two real brokers, each with its own worker process."""

from __future__ import annotations

import threading

import pytest

from django_celery_adv.registry import apps, using
from tests.testapp import tasks

pytestmark = pytest.mark.workers
RESULT_TIMEOUT = 30


def test_bound_tasks_run_on_their_own_workers(default_worker, global_worker):
    on_default = tasks.where_default.delay(1).get(timeout=RESULT_TIMEOUT)
    on_global = tasks.where_global.delay(2).get(timeout=RESULT_TIMEOUT)

    assert on_default["hostname"] == default_worker.name
    assert on_global["hostname"] == global_worker.name


def test_other_worker_never_registers_a_bound_task(default_worker, global_worker):
    registered = {}
    for worker in (default_worker, global_worker):
        reply = worker.app.control.inspect(destination=[worker.name], timeout=5,
                                           limit=1).registered()
        registered[worker.alias] = set(reply[worker.name])

    assert "testapp.where_default" in registered["default"]
    assert "testapp.where_default" not in registered["global"]
    assert "testapp.where_global" in registered["global"]
    assert "testapp.where_global" not in registered["default"]
    # Shared tasks are known everywhere; routing decides where they go.
    assert {"reports.tasks.build", "testapp.shared_echo"} <= registered["default"]
    assert {"reports.tasks.build", "testapp.shared_echo"} <= registered["global"]


def test_task_apps_routing_from_threads(default_worker, global_worker):
    """8 threads, half inside using() of the other app, none calling set_current()."""
    results: dict[int, dict] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def send(index: int) -> None:
        try:
            barrier.wait(10)
            if index % 2:
                with using("default"):
                    routed = tasks.build_report.delay(index)
                    echoed = tasks.shared_echo.delay(index)
            else:
                routed = tasks.build_report.delay(index)
                echoed = tasks.shared_echo.delay(index)
            results[index] = {"routed": routed.get(timeout=RESULT_TIMEOUT),
                              "echoed": echoed.get(timeout=RESULT_TIMEOUT)}
        except BaseException as e:  # reported below, with the thread's index
            errors.append(e)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert not errors, errors
    assert sorted(results) == list(range(8))
    for index, result in results.items():
        # TASK_APPS wins over using(): reports.tasks.* always goes to global.
        assert result["routed"] == {"value": index, "hostname": global_worker.name}
        # Unmatched shared tasks go to the thread's current app: default here.
        assert result["echoed"]["hostname"] == default_worker.name


def test_using_sends_unmatched_shared_task_through_that_app(default_worker, global_worker):
    with using("global"):
        inside = tasks.shared_echo.delay("in")
    outside = tasks.shared_echo.delay("out")

    assert inside.get(timeout=RESULT_TIMEOUT)["hostname"] == global_worker.name
    assert outside.get(timeout=RESULT_TIMEOUT)["hostname"] == default_worker.name


def test_apps_on_one_redis_only_see_their_own_workers(default_worker, twin_worker):
    assert apps["default"].conf.broker_url == apps["twin"].conf.broker_url

    default_pings = apps["default"].control.inspect(timeout=1.5).ping() or {}
    twin_pings = apps["twin"].control.inspect(timeout=1.5).ping() or {}

    assert set(default_pings) == {default_worker.name}
    assert set(twin_pings) == {twin_worker.name}


def test_apps_on_one_redis_never_consume_each_others_tasks(default_worker, twin_worker):
    on_twin = [tasks.where_twin.delay(i) for i in range(6)]
    on_default = [tasks.where_default.delay(i) for i in range(6)]

    assert {r.get(timeout=RESULT_TIMEOUT)["hostname"] for r in on_twin} == {twin_worker.name}
    assert {r.get(timeout=RESULT_TIMEOUT)["hostname"] for r in on_default} == \
        {default_worker.name}
