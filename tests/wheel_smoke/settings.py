"""Settings of the wheel smoke test's throwaway project (scripts/wheel_smoke.sh).

The script copies this folder into a temporary directory outside the source tree
and runs it with the installed wheel: nothing here may import the repository.
One app on the embedded filesystem broker (no server), SQLite, local-memory cache.
"""

import os
from pathlib import Path

VAR_DIR = Path(os.environ.get("SMOKE_VAR_DIR", Path(__file__).resolve().parent / "var"))

SECRET_KEY = "wheel-smoke-only"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1"]
INSTALLED_APPS = [
    *(f"django.contrib.{name}" for name in
      ("admin", "auth", "contenttypes", "sessions", "messages", "staticfiles")),
    "django_celery_beat",
    "django_celery_adv",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": ["django.template.context_processors.request",
                                       "django.contrib.auth.context_processors.auth",
                                       "django.contrib.messages.context_processors.messages"]},
}]
# One process writes at a time here: plain SQLite is enough.
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                         "NAME": VAR_DIR / "smoke.sqlite3"}}
USE_TZ = True
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_BROKER = VAR_DIR / "broker"
for _name in ("queue", "control", "processed"):
    (_BROKER / _name).mkdir(parents=True, exist_ok=True)

CELERY_ADV = {
    "APPS": {"default": {
        "broker_url": "filesystem://",
        "broker_transport": "django_celery_adv.transports.filesystem:Transport",
        "broker_transport_options": {
            "data_folder_in": str(_BROKER / "queue"),
            "data_folder_out": str(_BROKER / "queue"),
            "control_folder": str(_BROKER / "control"),
            "processed_folder": str(_BROKER / "processed"),
            "store_processed": False,
        },
    }},
}
