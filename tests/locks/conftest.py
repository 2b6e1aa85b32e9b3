"""Lock backends for the tests, each on its real server, described by capabilities.

A test asks for ``backend_name`` (or ``backend``, an instance of it) and gets
one run per backend; ``@pytest.mark.capability("ttl_expiry")`` narrows that to
the backends that have the capability (a backend without it is not collected,
not skipped). MongoDB runs on mongomock unless ``MONGODB_URL`` names a mongod.

Markers are applied here: ``django_db(transaction=True)`` only on tests that
touch the database (parameterised with the database backend, in a
``test_database*`` module, or using a fixture of :data:`DATABASE_FIXTURES`:
lock policies, the lock registry, workers), ``db`` on those and on tests
marked ``django_db`` by hand, ``workers`` on every test that starts a worker.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from unittest import mock

import pytest
from django.conf import settings

from django_celery_adv.locks.backends import create_backend
from django_celery_adv.locks.backends.base import LockBackend

ALL_BACKENDS = ["database", "redis", "zookeeper", "etcd", "mongodb"]

#: What each backend guarantees beyond the common contract.
#:
#: ``ttl_expiry``: a lease that is not renewed ends by its TTL (ZooKeeper's end
#: with the client session instead); ``survives_restart_tokens``: fencing tokens
#: keep growing across a server restart; ``cross_process``: a second process can
#: reach the same server (not mongomock); ``password``: the connection settings
#: can carry a password, which must never be shown; ``own_server``: the tests
#: can run a server instance of their own (tests/faults/servers.py) to restart.
CAPABILITIES: dict[str, frozenset[str]] = {
    "database": frozenset({"ttl_expiry", "survives_restart_tokens", "cross_process",
                           "password"}),
    "redis": frozenset({"ttl_expiry", "cross_process", "password", "own_server"}),
    "zookeeper": frozenset({"survives_restart_tokens", "cross_process", "own_server"}),
    "etcd": frozenset({"ttl_expiry", "survives_restart_tokens", "cross_process",
                       "own_server"}),
    "mongodb": frozenset({"ttl_expiry", "password"}
                         | ({"cross_process"} if settings.MONGODB_URL else set())),
}
#: Backends whose leases end by TTL; ZooKeeper's end with the client session.
TTL_BACKENDS = [b for b in ALL_BACKENDS if "ttl_expiry" in CAPABILITIES[b]]
#: Backends a separate process can reach: mongomock lives in one process only.
PROCESS_BACKENDS = [b for b in ALL_BACKENDS if "cross_process" in CAPABILITIES[b]]

#: Fixtures that read or write the database (lock policies, the registry, workers).
DATABASE_FIXTURES = {"registry_backends", "lock_policy", "db", "transactional_db",
                     "worker_pool", "default_worker", "global_worker", "twin_worker",
                     "victim_worker"}
#: Fixtures that start a real worker process.
WORKER_FIXTURES = {"worker_pool", "default_worker", "global_worker", "twin_worker",
                   "victim_worker"}


def backends_with(*capabilities: str) -> list[str]:
    return [b for b in ALL_BACKENDS if set(capabilities) <= CAPABILITIES[b]]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "capability(*names): run only on lock backends that have every capability")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" not in metafunc.fixturenames:
        return
    wanted = [name for marker in metafunc.definition.iter_markers("capability")
              for name in marker.args]
    metafunc.parametrize("backend_name", backends_with(*wanted))


def _uses_database(item: pytest.Item) -> bool:
    if "database" in item.path.name:  # test_database_backend.py and its fault tests
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "database" in callspec.params.values():
        return True
    return bool(DATABASE_FIXTURES & set(getattr(item, "fixturenames", ())))


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects by these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # ``db`` ("touches the database": the legs on other databases run these).
    db_marker = any(line.split(":")[0].strip() == "db" for line in config.getini("markers"))
    for item in items:
        if "tests/locks/" not in str(item.fspath):
            continue
        if WORKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.workers)
        if not (_uses_database(item) or item.get_closest_marker("django_db")):
            continue
        if db_marker and item.get_closest_marker("db") is None:
            item.add_marker(pytest.mark.db)
        # The database backend commits from several threads and processes:
        # real transactions, not a test transaction that others cannot see.
        if item.get_closest_marker("django_db") is None:
            item.add_marker(pytest.mark.django_db(transaction=True))


def backend_params(alias: str) -> dict:
    return settings.CELERY_ADV["LOCK_BACKENDS"][registry_alias(alias)]


def registry_alias(backend: str) -> str:
    """The ``LOCK_BACKENDS`` alias of a backend in the test settings."""
    return "default" if backend == "database" else backend


@contextlib.contextmanager
def mongo_client_patch() -> Iterator[str]:
    """mongomock in place of pymongo unless MONGODB_URL names a real mongod."""
    if settings.MONGODB_URL:
        yield "mongod"
        return
    import mongomock

    client = mongomock.MongoClient()
    with mock.patch("django_celery_adv.locks.backends.mongodb.MongoClient",
                    lambda *args, **kwargs: client):
        yield "mongomock"


@pytest.fixture(scope="session", autouse=True)
def clean_lock_servers():
    """Token counters and slots of earlier runs would only pile up: start empty."""
    import redis

    client = redis.Redis.from_url(settings.REDIS_LOCK_URL)
    prefix = backend_params("redis")["OPTIONS"]["prefix"]
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def make_backend(request) -> Iterator[Callable[..., LockBackend]]:
    """Factory: a fresh backend instance for the alias (settings OPTIONS, updated by
    keyword arguments), closed after the test."""
    made = []
    stack = contextlib.ExitStack()

    def make(alias: str, **options) -> LockBackend:
        if alias == "mongodb" and not any(b.alias == "mongodb" for b in made):
            mode = stack.enter_context(mongo_client_patch())
            request.node.user_properties.append(("mongodb", mode))
        params = backend_params(alias)
        params = {**params, "OPTIONS": {**(params.get("OPTIONS") or {}), **options}}
        backend = create_backend(alias, params)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()
    stack.close()


@pytest.fixture
def backend(backend_name, make_backend) -> LockBackend:
    return make_backend(backend_name)


@pytest.fixture
def lock_name() -> str:
    return f"contract-{uuid.uuid4().hex[:12]}"
