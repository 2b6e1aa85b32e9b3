"""Remote control of one worker of one app: pool size, autoscale, consumers, limits, shutdown.

Each call sends one Celery control command (``celery.worker.control``) to one
named worker on the app's own control exchange (so a worker of another app
on the same broker never obeys it) and returns the worker's answer as a
:class:`ControlReply`.

Guarantees:

* **One worker.** The command carries ``destination=[worker]``; nothing is
  broadcast to the others.
* **A readable outcome, never an exception** for broker or worker trouble:
  the worker's own ``ok`` / ``error`` text, "no reply within N s", or the
  broker's error (masked: :mod:`.brokers`).
* **Bounded.** Connect, socket and reply waits are ``INSPECT_TIMEOUT``
  (or ``timeout``); the call returns as soon as the worker answered.
* ``shutdown`` expects no reply (the worker stops instead of answering);
  its outcome says the command was sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.utils.translation import gettext as _

from . import conf
from .brokers import bounded_connection, masked_error
from .exceptions import BrokerError
from .registry import apps

#: Control commands that answer nothing (the worker goes away instead).
NO_REPLY = frozenset({"shutdown"})


@dataclass(frozen=True)
class ControlReply:
    """What became of one command: ``ok`` and the worker's (or broker's) words."""

    ok: bool
    message: str


def _reply(answers: Any, worker: str, timeout: float) -> ControlReply:
    for answer in answers or ():
        body = answer.get(worker) if isinstance(answer, dict) else None
        if isinstance(body, dict):
            if "ok" in body:
                return ControlReply(True, str(body["ok"]))
            if "error" in body:
                return ControlReply(False, str(body["error"]))
        elif body is not None:  # a command that replies with a bare value
            return ControlReply(True, str(body))
    return ControlReply(False, _("no reply from %(worker)s within %(timeout)g s")
                        % {"worker": worker, "timeout": timeout})


def send_command(alias: str, worker: str, command: str,
                 arguments: Mapping[str, Any] | None = None,
                 timeout: float | None = None) -> ControlReply:
    """Send ``command`` with ``arguments`` to ``worker`` of ``alias``; its answer.

    ``command`` is a Celery control command name (``pool_grow``,
    ``pool_shrink``, ``autoscale``, ``add_consumer``, ``cancel_consumer``,
    ``rate_limit``, ``time_limit``, ``shutdown`` ...). An unknown alias
    raises :class:`~.exceptions.ImproperlyConfiguredApp`; everything else is
    in the returned :class:`ControlReply`.
    """
    app = apps[alias]
    timeout = float(conf.get("INSPECT_TIMEOUT") if timeout is None else timeout)
    wants_reply = command not in NO_REPLY
    try:
        with bounded_connection(app, timeout) as connection:
            answers = app.control.broadcast(
                command, arguments=dict(arguments or {}), destination=[worker],
                reply=wants_reply, timeout=timeout, limit=1 if wants_reply else None,
                connection=connection)
    except BrokerError as e:
        return ControlReply(False, str(e))
    except Exception as e:  # the broker failing mid-way: the outcome, not a 500
        return ControlReply(False, masked_error(app, e))
    if not wants_reply:
        return ControlReply(True, _("%(command)s sent to %(worker)s")
                            % {"command": command, "worker": worker})
    return _reply(answers, worker, timeout)


def pool_grow(alias: str, worker: str, n: int = 1) -> ControlReply:
    """Add ``n`` processes to the worker's pool (prefork; or raise its autoscale floor)."""
    return send_command(alias, worker, "pool_grow", {"n": n})


def pool_shrink(alias: str, worker: str, n: int = 1) -> ControlReply:
    """Remove ``n`` processes from the worker's pool."""
    return send_command(alias, worker, "pool_shrink", {"n": n})


def autoscale(alias: str, worker: str, max_concurrency: int,
              min_concurrency: int) -> ControlReply:
    """New autoscale bounds (the worker must run with ``--autoscale``)."""
    return send_command(alias, worker, "autoscale",
                        {"max": max_concurrency, "min": min_concurrency})


def add_consumer(alias: str, worker: str, queue: str) -> ControlReply:
    """Make the worker consume ``queue`` as well."""
    return send_command(alias, worker, "add_consumer", {"queue": queue})


def cancel_consumer(alias: str, worker: str, queue: str) -> ControlReply:
    """Make the worker stop consuming ``queue``."""
    return send_command(alias, worker, "cancel_consumer", {"queue": queue})


def rate_limit(alias: str, worker: str, task_name: str, rate: str) -> ControlReply:
    """Rate limit of ``task_name`` on the worker (``"10/m"``; ``"0"`` lifts it)."""
    return send_command(alias, worker, "rate_limit",
                        {"task_name": task_name, "rate_limit": rate})


def time_limit(alias: str, worker: str, task_name: str, soft: float | None,
               hard: float | None) -> ControlReply:
    """Soft and hard time limits (seconds; ``None`` = none) of ``task_name`` on the worker."""
    return send_command(alias, worker, "time_limit",
                        {"task_name": task_name, "soft": soft, "hard": hard})


def shutdown(alias: str, worker: str) -> ControlReply:
    """Ask the worker to finish its running tasks and exit (warm shutdown)."""
    return send_command(alias, worker, "shutdown")
