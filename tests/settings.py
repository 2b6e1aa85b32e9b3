"""Settings of the test suite: real servers on loopback, chosen by env vars.

``TEST_DB=sqlite|postgres|mariadb`` picks the database (CI runs SQLite and
PostgreSQL in full, MariaDB for the tests marked ``db``). Worker
processes started by the fixtures import these same settings, so the test
process and its workers share one configuration.
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
BUILD_DIR = Path(os.environ.get("TEST_BUILD_DIR", BASE_DIR / "build" / "tests"))
BUILD_DIR.mkdir(parents=True, exist_ok=True)

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
TEST_DB = os.environ.get("TEST_DB", "sqlite")

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ROOT_URLCONF = "tests.urls"
STATIC_URL = "static/"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django_celery_beat",
    "django_celery_adv",
    "tests.testapp",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]

if TEST_DB == "postgres":
    _PG_NAME = os.environ.get("TEST_PG_NAME", "celery_adv")
    DATABASES = {"default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _PG_NAME,
        "HOST": os.environ.get("TEST_PG_HOST", "127.0.0.1"),
        "PORT": os.environ.get("TEST_PG_PORT", "5432"),
        "USER": os.environ.get("TEST_PG_USER", "postgres"),
        "PASSWORD": os.environ.get("TEST_PG_PASSWORD", ""),
        # Worker processes connect to the database pytest-django created.
        "TEST": {"NAME": f"test_{_PG_NAME}"},
    }}
elif TEST_DB == "sqlite":
    DATABASES = {"default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": BUILD_DIR / "celery_adv.sqlite3",
        "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 30,
                    "init_command": "PRAGMA journal_mode=WAL;"},
        # A file, not :memory:, so worker processes see the test database.
        "TEST": {"NAME": str(BUILD_DIR / "test_celery_adv.sqlite3")},
    }}
elif TEST_DB == "mariadb":
    # PyMySQL (pure Python, no client library to build) standing in for mysqlclient.
    import pymysql

    pymysql.install_as_MySQLdb()
    _MARIADB_NAME = os.environ.get("TEST_MARIADB_NAME", "celery_adv")
    DATABASES = {"default": {
        "ENGINE": "django.db.backends.mysql",
        "NAME": _MARIADB_NAME,
        "HOST": os.environ.get("TEST_MARIADB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("TEST_MARIADB_PORT", "3306"),
        "USER": os.environ.get("TEST_MARIADB_USER", "root"),
        "PASSWORD": os.environ.get("TEST_MARIADB_PASSWORD", ""),
        # InnoDB's own default (Django's is READ COMMITTED): the harder case for
        # every model; the lock backend's tests also run at the other levels.
        "OPTIONS": {"charset": "utf8mb4",
                    "isolation_level": os.environ.get("TEST_MARIADB_ISOLATION",
                                                      "repeatable read")},
        "TEST": {"NAME": f"test_{_MARIADB_NAME}", "CHARSET": "utf8mb4",
                 "COLLATION": "utf8mb4_unicode_ci"},
    }}
else:
    raise RuntimeError(f"TEST_DB must be 'sqlite', 'postgres' or 'mariadb', not {TEST_DB!r}")

# Worker processes are started with TEST_USE_TEST_DB=1: they must use the
# database pytest-django created, not the one named in NAME.
if os.environ.get("TEST_USE_TEST_DB") == "1":
    DATABASES["default"]["NAME"] = DATABASES["default"]["TEST"]["NAME"]

CELERY_ADV = {
    "APPS": {
        "default": {"broker_url": REDIS_URL, "result_backend": REDIS_URL},
        "global": {"broker_url": AMQP_URL, "result_backend": "rpc://"},
        # Same Redis database as "default": isolated by its own queue and
        # control exchange (see registry.isolation_defaults).
        "twin": {"broker_url": REDIS_URL, "result_backend": REDIS_URL},
    },
    "TASK_APPS": {"reports.tasks.*": "global"},
}
for _app in CELERY_ADV["APPS"].values():
    _app.update(worker_prefetch_multiplier=1, task_track_started=True,
                broker_connection_retry_on_startup=True)

ZOOKEEPER_HOSTS = os.environ.get("TEST_ZOOKEEPER_HOSTS", "127.0.0.1:2181")
ETCD_HOST = os.environ.get("TEST_ETCD_HOST", "127.0.0.1")
ETCD_PORT = int(os.environ.get("TEST_ETCD_PORT", "2379"))
REDIS_LOCK_URL = os.environ.get("TEST_REDIS_LOCK_URL", "redis://127.0.0.1:6379/12")
# Keys of the shared lock servers (Redis prefix, ZooKeeper root, etcd prefix):
# runs that share a server at the same time each take their own namespace.
LOCK_NAMESPACE = os.environ.get("TEST_LOCK_NAMESPACE", "celery-adv-test")
# No mongod can be installed on these machines: without MONGODB_URL the
# MongoDB code paths run on mongomock (tests/mongo.py patches the client).
MONGODB_URL = os.environ.get("MONGODB_URL", "")

CELERY_ADV["LOCK_BACKENDS"] = {
    "default": {"BACKEND": "django_celery_adv.locks.backends.database.DatabaseBackend"},
    "redis": {"BACKEND": "django_celery_adv.locks.backends.redis.RedisBackend",
              "OPTIONS": {"url": REDIS_LOCK_URL, "prefix": f"{LOCK_NAMESPACE}:lock:"}},
    "zookeeper": {"BACKEND": "django_celery_adv.locks.backends.zookeeper.ZooKeeperBackend",
                  "OPTIONS": {"hosts": ZOOKEEPER_HOSTS, "root": f"/{LOCK_NAMESPACE}/locks",
                              "timeout": 4.0}},
    "etcd": {"BACKEND": "django_celery_adv.locks.backends.etcd.EtcdBackend",
             "OPTIONS": {"host": ETCD_HOST, "port": ETCD_PORT,
                         "prefix": f"/{LOCK_NAMESPACE}/locks/"}},
    "mongodb": {"BACKEND": "django_celery_adv.locks.backends.mongodb.MongoDBBackend",
                "OPTIONS": {"url": MONGODB_URL or "mongodb://127.0.0.1:27017",
                            "database": "celery_adv_test", "collection": "locks"}},
}
