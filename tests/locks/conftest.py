"""One fixture per lock backend, each on its real server (MongoDB: see tests/mongo_locks)."""

from __future__ import annotations

import contextlib
import uuid
from unittest import mock

import pytest
from django.conf import settings

from django_celery_adv.locks.backends import create_backend

ALL_BACKENDS = ["database", "redis", "zookeeper", "etcd", "mongodb"]
#: Backends whose leases end by TTL; ZooKeeper's end with the client session.
TTL_BACKENDS = ["database", "redis", "etcd", "mongodb"]


def pytest_collection_modifyitems(items):
    # The database backend commits from several threads: real transactions.
    for item in items:
        if "tests/locks/" in str(item.fspath):
            item.add_marker(pytest.mark.django_db(transaction=True))


def backend_params(alias: str) -> dict:
    return settings.CELERY_ADV["LOCK_BACKENDS"]["default" if alias == "database" else alias]


@contextlib.contextmanager
def mongo_client_patch():
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


@pytest.fixture
def make_backend(request):
    """Factory: a fresh backend instance for the alias, closed after the test."""
    made = []
    stack = contextlib.ExitStack()

    def make(alias: str):
        if alias == "mongodb" and not made:
            mode = stack.enter_context(mongo_client_patch())
            request.node.user_properties.append(("mongodb", mode))
        backend = create_backend(alias, backend_params(alias))
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()
    stack.close()


@pytest.fixture(params=ALL_BACKENDS)
def backend(request, make_backend):
    return make_backend(request.param)


@pytest.fixture(params=TTL_BACKENDS)
def ttl_backend(request, make_backend):
    return make_backend(request.param)


@pytest.fixture
def lock_name() -> str:
    return f"contract-{uuid.uuid4().hex[:12]}"
