"""The seed's two lock examples as real tasks on real worker processes."""

from __future__ import annotations

import pytest
import redis
from django.conf import settings

from django_celery_adv.models import LockDefinition
from tests.testapp import tasks
from tests.workers import WorkerProcess

pytestmark = pytest.mark.workers


@pytest.fixture(scope="module")
def wide_worker(default_worker):
    """Four more processes on the default queue: contention the lock must absorb."""
    worker = WorkerProcess("default", tag="-wide", concurrency=4).start()
    yield worker
    worker.stop()


@pytest.fixture
def counters():
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = ["save_to_storage:running", "save_to_storage:observed", "import_data:running",
            "import_data:observed", "import_data:runs"]
    client.delete(*keys)
    yield client
    client.delete(*keys)


def test_save_to_storage_never_runs_more_than_capacity(wide_worker, counters):
    LockDefinition.objects.create(name="test-save-to-storage", capacity=2, ttl=10,
                                  retry_countdown=0.3, retry_jitter=0.2, wait=0.2)

    results = [tasks.save_to_storage.delay(i) for i in range(6)]
    outcomes = [result.get(timeout=60) for result in results]

    assert [outcome["data"] for outcome in outcomes] == list(range(6))
    observed = [int(n) for n in counters.lrange("save_to_storage:observed", 0, -1)]
    assert len(observed) == 6
    assert max(observed) <= 2
    assert max(observed) == 2  # the lock really was shared by two at a time
    tokens = [outcome["token"] for outcome in outcomes]
    assert len(set(tokens)) == 6
    assert {outcome["slot"] for outcome in outcomes} <= {0, 1}


def test_import_data_runs_once_when_called_twice(wide_worker, counters):
    first = tasks.import_data.delay("https://example.test/a")
    second = tasks.import_data.delay("https://example.test/a")

    outcomes = sorted([first.get(timeout=60), second.get(timeout=60)], key=str)

    assert outcomes == [None, "https://example.test/a"]  # the duplicate was dropped
    assert counters.lrange("import_data:runs", 0, -1) == [b"https://example.test/a"]
    definition = LockDefinition.objects.get(name="test-import-data")
    assert (definition.capacity, definition.on_busy) == (1, "drop")
