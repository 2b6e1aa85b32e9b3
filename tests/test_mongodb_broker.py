"""A registry app whose broker is MongoDB runs tasks and answers ``inspect``.

On mongomock by default (see tests/mongo.py for what that does and does not
prove); on a real mongod, unpatched, when ``MONGODB_URL`` is set. The test id
says which: ``[mongomock]`` or ``[mongod]``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from celery import _state as celery_state
from celery.contrib.testing.worker import start_worker

from django_celery_adv.registry import AdvCelery, build_app
from tests import mongo

RESULT_TIMEOUT = 20
INSPECT_TIMEOUT = 10


mongo_broker_url = mongo.mongo_broker_url  # the fixture, made visible to this module


@pytest.fixture(scope="module")
def mongo_app(mongo_broker_url: str) -> Iterator[AdvCelery]:
    """The ``mongo`` alias built by the registry, with one task, and its worker."""
    app = build_app("mongo", {
        "broker_url": mongo_broker_url,
        # In-process worker: an in-memory result store is shared with it.
        "result_backend": "cache+memory://",
        "broker_transport_options": {"polling_interval": 0.05},
        "broker_connection_retry_on_startup": False,
        "worker_hijack_root_logger": False,
    })

    @app.task(name="mongo_tests.add", bind=True)
    def add(self, x: int, y: int) -> dict:
        # Evidence that the worker ran it from the broker, not the caller inline.
        return {"sum": x + y, "is_eager": self.request.is_eager,
                "queue": self.request.delivery_info["routing_key"],
                "thread": threading.get_ident()}

    # The registry's own names for the alias (queue "mongo", control exchange
    # "celery.mongo"), kept from run to run: kombu starts a new worker's
    # broadcast cursor at the count of the whole broadcast collection, so
    # broadcasts left there by other exchange names would hide the first
    # inspect replies (see tests/mongo.py). Tasks left by an aborted run go.
    app.control.purge()

    previous_default = celery_state.default_app
    previous_current = celery_state._tls.current_app
    try:
        # No start_worker ping check: its celery.ping is a shared task, which
        # the registry routes to the "default" alias (Redis), not to this app.
        # The tests below ping through inspect instead.
        with start_worker(app, pool="solo", perform_ping_check=False,
                          shutdown_timeout=30) as worker:
            app.adv_worker = worker
            yield app
    finally:
        # start_worker makes the app current and default for the process.
        celery_state.set_default_app(previous_default)
        celery_state._set_current_app(previous_current)


def test_transport_is_kombu_mongodb_on_the_announced_server(mongo_app: AdvCelery) -> None:
    with mongo_app.connection_for_write() as conn:
        channel = conn.default_channel
        assert conn.transport.driver_type == "mongodb"
        client_module = type(channel.client.client).__module__
    if mongo.MODE == "mongomock":
        assert client_module.startswith("mongomock.")
    else:
        assert client_module.startswith("pymongo.")


def test_task_runs_on_the_worker_and_returns(mongo_app: AdvCelery) -> None:
    result = mongo_app.tasks["mongo_tests.add"].delay(2, 3).get(timeout=RESULT_TIMEOUT)

    assert result["sum"] == 5
    assert result["is_eager"] is False
    assert result["queue"] == "mongo"  # the registry's default queue for the alias
    assert result["thread"] != threading.get_ident()


def test_inspect_ping_gets_the_workers_answer(mongo_app: AdvCelery) -> None:
    worker = mongo_app.adv_worker

    reply = mongo_app.control.inspect(timeout=INSPECT_TIMEOUT, limit=1).ping()

    assert reply == {worker.hostname: {"ok": "pong"}}


def test_inspect_registered_lists_the_apps_task(mongo_app: AdvCelery) -> None:
    worker = mongo_app.adv_worker

    reply = mongo_app.control.inspect(timeout=INSPECT_TIMEOUT, limit=1).registered()

    assert reply is not None
    assert "mongo_tests.add" in reply[worker.hostname]
