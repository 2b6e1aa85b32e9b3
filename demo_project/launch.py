"""Start the whole demo: migrate, an admin user, a worker per app, beat, the server.

Run by ``scripts/demo.sh``. Ctrl-C (or SIGTERM) stops every process it started;
if one of them dies, the others are stopped too and its log tail is printed.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANAGE = [sys.executable, str(ROOT / "manage.py")]
HOST = os.environ.get("DEMO_HOST", "127.0.0.1")
PORT = os.environ.get("DEMO_PORT", "8000")
ADMIN_USER = os.environ.get("DEMO_ADMIN_USER", "admin")


def manage(*args: str) -> None:
    subprocess.run([*MANAGE, *args], cwd=ROOT, check=True)


def create_admin() -> str:
    """Create (or reset) the admin user with a fresh password and return it."""
    password = os.environ.get("DEMO_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
    script = (
        "from django.contrib.auth import get_user_model\n"
        "User = get_user_model()\n"
        f"user, _ = User.objects.get_or_create(username={ADMIN_USER!r})\n"
        "user.is_staff = user.is_superuser = True\n"
        "import os; user.set_password(os.environ['DEMO_NEW_PASSWORD'])\n"
        "user.save()\n"
    )
    subprocess.run([*MANAGE, "shell", "-v", "0", "-c", script], cwd=ROOT, check=True,
                   env={**os.environ, "DEMO_NEW_PASSWORD": password})
    return password


def processes(log_dir: Path) -> dict[str, list[str]]:
    return {
        "worker-default": [*MANAGE, "celery", "default", "worker", "-l", "info", "-c", "2",
                           "-n", "default@%h"],
        "worker-global": [*MANAGE, "celery", "global", "worker", "-l", "info", "-c", "2",
                          "-n", "global@%h"],
        "beat": [*MANAGE, "celery", "default", "beat", "-l", "info",
                 "-S", "django_celery_beat.schedulers:DatabaseScheduler",
                 "--pidfile", str(log_dir / "beat.pid")],
        "web": [*MANAGE, "runserver", f"{HOST}:{PORT}", "--noreload"],
    }


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_project.settings")
    from django.conf import settings

    from django_celery_adv.masking import mask_url

    log_dir = Path(settings.VAR_DIR) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    manage("migrate", "--noinput", "-v", "0")
    password = create_admin()

    running: dict[str, subprocess.Popen] = {}
    stopping = False

    def stop(*_args: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for name, command in processes(log_dir).items():
        log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        running[name] = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        log.close()

    print(f"""
django-celery-adv demo is starting (logs in {log_dir})
  admin:     http://{HOST}:{PORT}/admin/   user {ADMIN_USER!r}  password {password!r}
  brokers:   default -> {mask_url(settings.CELERY_ADV['APPS']['default']['broker_url'])}
             global  -> {mask_url(settings.CELERY_ADV['APPS']['global']['broker_url'])}
  send demo tasks:  .venv/bin/python manage.py send_demo_tasks
  Ctrl-C stops everything.
""", flush=True)

    exit_code = 0
    while not stopping:
        for name, process in running.items():
            if process.poll() is not None:
                print(f"{name} exited with {process.returncode}; its log ends with:")
                print("\n".join((log_dir / f"{name}.log").read_text(errors="replace")
                                .splitlines()[-20:]))
                stopping, exit_code = True, 1
                break
        time.sleep(0.5)

    print("stopping the demo ...", flush=True)
    for process in running.values():
        if process.poll() is None:
            # The main process only: a Celery worker then shuts its pool down
            # itself (warm shutdown); the group is killed only past the deadline.
            process.terminate()
    deadline = time.monotonic() + 15
    for process in running.values():
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
