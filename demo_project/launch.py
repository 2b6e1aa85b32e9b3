"""Start the whole demo: migrate, an admin user, a worker and two beats per app, the web server.

Run by ``scripts/demo.sh``. The port is checked first: if something listens
on ``DEMO_PORT``, the launcher says which process and exits before touching
anything. Then it supervises (``demo_project.supervisor``): a child that
crashes is restarted with a backoff and its error line printed, the others
(the web server included) keep running. Ctrl-C, SIGTERM and SIGHUP (the
terminal closed) stop everything within 10 s, with progress printed; a second
Ctrl-C kills at once.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from demo_project import ports
from demo_project.supervisor import Supervisor

ROOT = Path(__file__).resolve().parent.parent
MANAGE = [sys.executable, str(ROOT / "manage.py")]
HOST = os.environ.get("DEMO_HOST", "127.0.0.1")
PORT = int(os.environ.get("DEMO_PORT", "8000"))
ADMIN_USER = os.environ.get("DEMO_ADMIN_USER", "admin")


def say(text: str) -> None:
    """Print, surviving a closed terminal (after SIGHUP a write fails with EIO)."""
    with contextlib.suppress(OSError):
        print(text, flush=True)


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


def processes(var_dir: Path) -> dict[str, list[str]]:
    return {
        "worker-default": [*MANAGE, "celery", "default", "worker", "-l", "info", "-c", "2",
                           "-n", "default@%h"],
        "worker-global": [*MANAGE, "celery", "global", "worker", "-l", "info", "-c", "2",
                          "-n", "global@%h"],
        # Two beats per app: one leads, the other stands by (LockedScheduler).
        **{f"beat-{alias}-{n}": [*MANAGE, "celery", alias, "beat", "-l", "info",
                                 "-S", "django_celery_adv", "--pidfile="]
           for alias in ("default", "global") for n in (1, 2)},
        # Task history from both apps' events (admin "Tasks"); turns worker events on.
        "events": [*MANAGE, "celery_events"],
        "web": [*MANAGE, "runserver", f"{HOST}:{PORT}", "--noreload"],
    }


def port_taken_message() -> str:
    return (f"port {PORT} on {HOST} is already in use by {ports.holder(PORT)}.\n"
            "Stop that process (an earlier demo? its terminal may be gone), or pick "
            f"another port:\n  DEMO_PORT={ports.spare_port(HOST, PORT)} bash scripts/demo.sh")


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_project.settings")
    if ports.in_use(HOST, PORT):
        say(port_taken_message())
        return 2
    from django.conf import settings

    from django_celery_adv.masking import mask_url

    var_dir = Path(settings.VAR_DIR)
    log_dir = var_dir / "logs"
    signals: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, _frame: signals.append(signum))
    try:
        manage("migrate", "--noinput", "-v", "0")
        password = create_admin()
    except subprocess.CalledProcessError:
        if signals:  # Ctrl-C reached the command too: nothing started yet
            return 0
        raise
    supervisor = Supervisor(processes(var_dir), log_dir, cwd=ROOT, say=say)
    if not signals:
        supervisor.start()
        say(f"""
django-celery-adv demo is starting (fresh logs in {log_dir})
  admin:     http://{HOST}:{PORT}/admin/   user {ADMIN_USER!r}  password {password!r}
  brokers:   default -> {mask_url(settings.CELERY_ADV['APPS']['default']['broker_url'])}
             global  -> {mask_url(settings.CELERY_ADV['APPS']['global']['broker_url'])}
  send demo tasks:  .venv/bin/python manage.py send_demo_tasks
  beats:     two per app; admin "Beat processes" and `manage.py celery_status beat` say which leads
  tasks:     history from events (celery_events): admin "Tasks"
  Ctrl-C stops everything (a crashed process is restarted; its error is shown here).
""")
        supervisor.run(lambda: bool(signals))
    name = signal.Signals(signals[0]).name if signals else "a signal"
    say(f"{name} received: stopping the demo (at most 10 s; Ctrl-C again kills at once)")
    clean = supervisor.stop(hurry=lambda: len(signals) > 1)
    say("demo stopped" + ("" if clean else " (some processes had to be killed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
