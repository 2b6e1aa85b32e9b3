"""Demo settings: runs with no server at all, or on real brokers via env vars.

Embedded defaults: SQLite, the ``filesystem://`` broker (fanout works, so
``inspect`` does) on the project's transport that writes each message whole
(``django_celery_adv.transports.filesystem``: kombu's own can hand a worker a
half-written file, kombu #1551), file result backend, the database lock backend.
``DEMO_DEFAULT_BROKER`` / ``DEMO_GLOBAL_BROKER`` switch an app to a Redis,
RabbitMQ or MongoDB URL (its result backend follows: Redis and MongoDB keep
results in the same server, RabbitMQ uses ``rpc://``).
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("DEMO_VAR_DIR", BASE_DIR / "build" / "demo")).resolve()

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "django_celery_adv",
    "demo_project.demo",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    # The admin in the browser's language: English, or Russian (the shipped catalogue).
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "demo_project.urls"
LANGUAGES = [("en", "English"), ("ru", "Русский")]
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [],
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
DATABASES = {"default": {
    "ENGINE": "django.db.backends.sqlite3",
    "NAME": VAR_DIR / "demo.sqlite3",
    "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL;"},
}}
USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def filesystem_app(alias: str) -> dict:
    """Celery settings for one app on the embedded filesystem broker."""
    root = VAR_DIR / "broker" / alias
    folders = {name: root / name for name in ("queue", "control", "processed")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    (VAR_DIR / "results" / alias).mkdir(parents=True, exist_ok=True)
    return {
        "broker_url": "filesystem://",
        "broker_transport": "django_celery_adv.transports.filesystem:Transport",
        "broker_transport_options": {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "control_folder": str(folders["control"]),
            "processed_folder": str(folders["processed"]),
            "store_processed": False,
            "polling_interval": 0.1,
        },
        "result_backend": f"file://{VAR_DIR / 'results' / alias}",
    }


def server_app(broker_url: str) -> dict:
    """Celery settings for one app on a real broker given by URL."""
    backend = broker_url if broker_url.startswith(("redis", "mongodb")) else "rpc://"
    return {"broker_url": broker_url, "result_backend": backend}


def demo_app(alias: str) -> dict:
    url = os.environ.get(f"DEMO_{alias.upper()}_BROKER")
    settings = server_app(url) if url else filesystem_app(alias)
    # result_extended: results name the worker that ran them (send_demo_tasks prints it).
    settings.update(task_track_started=True, worker_prefetch_multiplier=1, result_extended=True)
    return settings


CELERY_ADV = {
    "APPS": {"default": demo_app("default"), "global": demo_app("global")},
    "TASK_APPS": {"demo.reports.*": "global"},
}
CELERY_ADV["APPS"]["default"]["beat_schedule"] = {
    "demo-heartbeat": {"task": "demo.tasks.add", "schedule": 60.0, "args": (20, 22)},
}
