"""Fixtures: real servers (checked once, loudly) and real worker processes."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import pytest
from django.conf import settings

from tests.browser import serving_admin_static
from tests.workers import WorkerProcess

#: service -> (URL setting, what installs/starts it)
SERVICES = {
    "Redis": (settings.REDIS_URL, "apt-get install redis-server, or run scripts/test.sh"),
    "RabbitMQ": (settings.AMQP_URL, "apt-get install rabbitmq-server, or run scripts/test.sh"),
    "ZooKeeper": (f"zk://{settings.ZOOKEEPER_HOSTS.split(',')[0]}",
                  "apt-get install zookeeper, or run scripts/test.sh"),
    "etcd": (f"http://{settings.ETCD_HOST}:{settings.ETCD_PORT}",
             "apt-get install etcd-server, or run scripts/test.sh"),
}
_db = settings.DATABASES["default"]
if _db["ENGINE"].endswith("postgresql"):
    SERVICES["PostgreSQL"] = (f"postgresql://{_db['HOST']}:{_db['PORT']}",
                              "apt-get install postgresql, or run scripts/test.sh")
elif _db["ENGINE"].endswith("mysql"):
    SERVICES["MariaDB"] = (f"mysql://{_db['HOST']}:{_db['PORT']}",
                           "apt-get install mariadb-server, or run scripts/test.sh")


def _listening(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 5672), timeout=2):
            return True
    except OSError:
        return False


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [f"{name} at {urlsplit(url).hostname}:{urlsplit(url).port}: {how}"
               for name, (url, how) in SERVICES.items() if not _listening(url)]
    if missing:
        pytest.exit("servers the tests need are not reachable (nothing is skipped):\n  "
                    + "\n  ".join(missing), returncode=3)


def pytest_report_header(config: pytest.Config) -> list[str]:
    db = settings.DATABASES["default"]
    return [f"django-celery-adv: database {db['ENGINE'].rsplit('.', 1)[-1]}, "
            f"redis {settings.REDIS_URL}, rabbitmq {urlsplit(settings.AMQP_URL).hostname}"]


@pytest.fixture(scope="module")
def styled_live_server(request):
    """pytest-django's ``live_server``, serving the admin's CSS too (the test
    settings have no staticfiles app): for the browser tests' screenshots."""
    with serving_admin_static():
        yield request.getfixturevalue("live_server")


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup):
    """pytest-django's, plus: the database lock backend's own connections are
    closed before the test databases are dropped (PostgreSQL will not drop a
    database still in use)."""
    yield
    from django_celery_adv.locks.backends.database import close_own_connections

    close_own_connections()


@pytest.fixture(scope="session")
def clean_brokers():
    """Empty the test Redis database and the apps' queues once per session."""
    import redis

    from django_celery_adv.registry import apps

    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    for alias in apps:
        with apps[alias].connection_for_write() as connection:
            apps[alias].control.purge(connection=connection)


@pytest.fixture(scope="session")
def worker_pool(django_db_setup, django_db_blocker, clean_brokers):
    """Start each alias's worker once per session; stop them all at the end."""
    started: dict[str, WorkerProcess] = {}

    def get(alias: str) -> WorkerProcess:
        if alias not in started:
            started[alias] = WorkerProcess(alias).start()
        return started[alias]

    yield get
    for worker in started.values():
        worker.stop()


@pytest.fixture(scope="session")
def default_worker(worker_pool) -> WorkerProcess:
    return worker_pool("default")


@pytest.fixture(scope="session")
def global_worker(worker_pool) -> WorkerProcess:
    return worker_pool("global")


@pytest.fixture(scope="session")
def twin_worker(worker_pool) -> WorkerProcess:
    return worker_pool("twin")


#: Fixtures that start worker processes: their tests are marked ``workers``.
_WORKER_FIXTURES = {"worker_pool", "default_worker", "global_worker", "twin_worker"}
#: Fixtures through which a test reaches the database (workers use the test database too).
_DATABASE_FIXTURES = {"db", "transactional_db", "django_db_setup", "admin_client",
                      "django_user_model"}


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects by the marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``db`` every test that touches the database, so that the legs on
    PostgreSQL and MariaDB run those only (``-m db``): what never reaches the
    database gains nothing from running once per database. Mark ``workers``
    every test that uses a worker fixture, so ``-m "not workers"`` leaves it out
    even where its module forgot the marker."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if _WORKER_FIXTURES & fixtures and not item.get_closest_marker("workers"):
            item.add_marker(pytest.mark.workers)
        if item.get_closest_marker("db"):
            continue
        if item.get_closest_marker("django_db") or \
                _DATABASE_FIXTURES & fixtures:
            item.add_marker(pytest.mark.db)
