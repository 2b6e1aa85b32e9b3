"""Run by ``manage.py shell -c``: the admin pages of the installed wheel render.

Prints one line per page; exits non-zero on the first page that is not a 200 or
does not use the package's own template, or when a file the pages need is missing.
"""

import sys
from importlib import metadata
from pathlib import Path

from django.contrib.auth import get_user_model
from django.contrib.staticfiles import finders
from django.test import Client
from django.test.utils import setup_test_environment
from django.urls import reverse

import django_celery_adv
from django_celery_adv.models import LockDefinition


def fail(message: str) -> None:
    print(f"FAIL: {message}")
    sys.exit(1)


# The wheel, not the source tree: the package must come from the venv's site-packages.
package_dir = Path(django_celery_adv.__file__).resolve().parent
if "site-packages" not in package_dir.parts:
    fail(f"django_celery_adv imported from {package_dir}, not from an installed wheel")
print(f"django_celery_adv from {package_dir}")

setup_test_environment()  # records the templates each response used
User = get_user_model()
User.objects.filter(username="smoke").delete()
User.objects.create_superuser("smoke", "smoke@example.invalid", "smoke-password")
client = Client()
if not client.login(username="smoke", password="smoke-password"):
    fail("the superuser cannot log in")

# page -> a template of ours it must render with (None: the admin's own)
PAGES = {
    "admin:django_celery_adv_lockdefinition_changelist": None,
    "admin:django_celery_adv_taskfailure_changelist": None,
    "admin:django_celery_adv_monitoring_changelist":
        "admin/django_celery_adv/monitoring/workers.html",
    "admin:django_celery_adv_monitoring_locks":
        "admin/django_celery_adv/monitoring/lock_holders.html",
    "admin:django_celery_adv_beatnode_changelist":
        "admin/django_celery_adv/beat/change_list.html",
}
definition, _ = LockDefinition.objects.get_or_create(name="smoke-lock")
PAGES["admin:django_celery_adv_lockdefinition_change"] = (
    "admin/django_celery_adv/lockdefinition/holders.html")
for name, template in PAGES.items():
    args = [definition.pk] if name.endswith("_change") else []
    url = reverse(name, args=args)
    response = client.get(url)
    used = [t.name for t in response.templates if t.name]
    if response.status_code != 200:
        fail(f"{url} answered {response.status_code}")
    if template and template not in used:
        fail(f"{url} did not render {template} (used: {', '.join(sorted(set(used)))})")
    print(f"{response.status_code} {url}")

for path in ("admin/css/base.css", "admin/css/changelists.css"):
    if not finders.find(path):
        fail(f"static file {path} not found")
print("static files found")

# One version: the wheel's metadata (pyproject.toml) and the package's __version__.
installed = metadata.version("django-celery-adv")
if installed != django_celery_adv.__version__:
    fail(f"wheel version {installed} but django_celery_adv.__version__ "
         f"{django_celery_adv.__version__}")
print(f"version {installed}")
