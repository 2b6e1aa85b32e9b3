"""Worker and beat logging from settings: Celery's ``setup_logging`` hook, made safe.

``CELERY_ADV["LOGGING"]`` (or ``CELERY_ADV["APPS"][alias]["LOGGING"]``, which
wins for the processes of that alias) is one of:

``None``
    Celery's own logging setup, untouched. When neither the global value nor
    any app's sets one, no receiver is connected at all: connecting any
    ``setup_logging`` receiver turns Celery's setup off.
a ``dict``
    Applied with :func:`logging.config.dictConfig` in worker and beat
    processes. Unlike ``dictConfig``'s own default, existing loggers stay
    enabled unless the dict sets ``disable_existing_loggers`` (Celery's loggers
    exist before the hook runs). A dict without a ``root`` level leaves the
    root logger at the level given on the command line (``-l info``).
a dotted path
    A callable, called as ``hook(loglevel=..., logfile=..., format=...,
    colorize=...)``: the arguments of Celery's ``setup_logging`` signal.

Guarantees:

- The receiver is connected from ``AppConfig.ready()``, so it is in place
  before any worker or beat starts, and it never raises: an error in the hook
  (a bad dict, a missing handler class, an exception in the callable) is
  printed to stderr with its traceback, and the process goes on with a console
  handler at the requested level (a file handler when ``--logfile`` was given).
  Celery itself would swallow it (celery #9506) or, in newer releases, abort
  the worker.
- Every handler configured by the hook gets a :class:`TaskContextFilter`, so
  records carry ``alias``, ``task_name`` and ``task_id`` (``"-"`` outside a
  task) and formats may use ``%(alias)s %(task_name)s %(task_id)s``.

Which alias a process runs is the one ``manage.py celery <alias>`` put in
``CELERY_ADV_APP``; a process started otherwise uses the global value.

Ready-made pieces: :func:`syslog_logging` (UDP host/port or ``/dev/log``) and
:func:`json_formatter` (python-json-logger).
"""

from __future__ import annotations

import copy
import logging
import logging.config
import os
import sys
import traceback
from collections.abc import Mapping
from typing import Any

from celery import signals
from celery._state import get_current_task
from django.utils.module_loading import import_string

from . import conf
from .cli import ALIAS_ENV

#: The per-app key in ``CELERY_ADV["APPS"][alias]``. Uppercase, like every key of
#: this library, so it never collides with Celery's lowercase setting names.
APP_LOGGING_KEY = "LOGGING"

#: Celery's default worker format, used when the signal passes none.
FALLBACK_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"

#: Plain-text format of :func:`syslog_logging`: the tag syslog readers split on,
#: then the app and task a line belongs to.
SYSLOG_FORMAT = ("celery[%(process)d]: %(levelname)s [%(alias)s %(task_name)s %(task_id)s] "
                 "%(name)s: %(message)s")

#: Fields of :func:`json_formatter` (any ``LogRecord`` attribute may be added).
JSON_FIELDS = ("asctime", "levelname", "name", "message", "alias", "task_name", "task_id",
               "process", "processName")

NO_VALUE = "-"
_DISPATCH_UID = "django_celery_adv.logconfig.setup_logging"


class TaskContextFilter(logging.Filter):
    """Adds ``alias``, ``task_name`` and ``task_id`` to every record it sees.

    Installed on handlers (a logger's filters do not see records propagated
    from child loggers). Never drops a record. The task is Celery's current
    task of the process, so lines a task logs through any logger carry its id;
    the alias is the task's app's, else the process's.
    """

    def __init__(self, alias: str | None = None) -> None:
        super().__init__()
        self.alias = alias if alias is not None else process_alias() or NO_VALUE

    def filter(self, record: logging.LogRecord) -> bool:
        task = get_current_task()
        request_id = getattr(getattr(task, "request", None), "id", None) if task else None
        if request_id:
            record.task_name = task.name
            record.task_id = request_id
            record.alias = getattr(task.app, "alias", None) or self.alias
        else:
            record.task_name = getattr(record, "task_name", NO_VALUE)
            record.task_id = getattr(record, "task_id", NO_VALUE)
            record.alias = getattr(record, "alias", self.alias)
        return True


# -- which configuration applies ---------------------------------------------

def process_alias() -> str | None:
    """The alias this process runs (set by ``manage.py celery <alias>``), if any."""
    return os.environ.get(ALIAS_ENV) or None


def logging_config(alias: str | None) -> Any:
    """The ``LOGGING`` value for ``alias``: the app's own key if present, else the global."""
    app = conf.app_settings().get(alias) if alias else None
    if isinstance(app, Mapping) and APP_LOGGING_KEY in app:
        return app[APP_LOGGING_KEY]
    return conf.get("LOGGING")


def receiver_needed() -> bool:
    """Whether any process of this project would configure logging through us."""
    if conf.get("LOGGING") is not None:
        return True
    return any(isinstance(app, Mapping) and app.get(APP_LOGGING_KEY) is not None
               for app in conf.app_settings().values())


def connect() -> bool:
    """Connect the ``setup_logging`` receiver if a setting asks for it (no I/O).

    Returns whether it is connected. Called from ``AppConfig.ready()``.
    """
    if not receiver_needed():
        return False
    signals.setup_logging.connect(on_setup_logging, weak=False, dispatch_uid=_DISPATCH_UID)
    return True


def disconnect() -> None:
    signals.setup_logging.disconnect(on_setup_logging, dispatch_uid=_DISPATCH_UID)


def is_connected() -> bool:
    """Whether our ``setup_logging`` receiver is connected in this process."""
    return any(key[0] == _DISPATCH_UID for key, _ in signals.setup_logging.receivers)


# -- the receiver ---------------------------------------------------------------

def on_setup_logging(loglevel: int | str | None = None, logfile: str | None = None,
                     format: str | None = None, colorize: bool | None = None,
                     **kwargs: Any) -> None:
    """Celery's ``setup_logging`` receiver: apply the setting; never raise."""
    alias = process_alias()
    level = _level(loglevel)
    try:
        config = logging_config(alias)
        if config is None:
            # Another app of this project configures logging, this one does not:
            # give the process Celery's own setup, as if we were not connected.
            _delegate_to_celery(alias, loglevel, logfile, format, colorize)
            return
        apply_config(config, loglevel=level, logfile=logfile, format=format, colorize=colorize)
    except Exception:
        report_hook_error(alias, level, logfile)
        install_fallback(level, logfile, format)
    install_context_filter(alias)


def apply_config(config: Any, *, loglevel: int = logging.INFO, logfile: str | None = None,
                 format: str | None = None, colorize: bool | None = None) -> None:
    """Apply one ``LOGGING`` value (a dict or a dotted path); errors propagate."""
    if isinstance(config, Mapping):
        config = copy.deepcopy(dict(config))  # dictConfig consumes what it is given
        config.setdefault("version", 1)
        config.setdefault("disable_existing_loggers", False)
        logging.config.dictConfig(config)
        if not config.get("incremental") and "level" not in (config.get("root") or {}):
            logging.getLogger().setLevel(loglevel)
    elif isinstance(config, str):
        hook = import_string(config)
        hook(loglevel=loglevel, logfile=logfile, format=format, colorize=colorize)
    else:
        raise TypeError(f"CELERY_ADV['LOGGING'] must be None, a dict or a dotted path, "
                        f"not {type(config).__name__}")


def report_hook_error(alias: str | None, level: int, logfile: str | None = None) -> None:
    """Print the current exception to stderr: the hook failed, say so loudly."""
    where = f"CELERY_ADV['APPS'][{alias!r}]['LOGGING']" if alias and _has_app_key(alias) \
        else "CELERY_ADV['LOGGING']"
    target = f"the log file {logfile}" if logfile else "a console handler"
    print(f"django-celery-adv: the logging hook {where} failed; logging to {target} "
          f"at level {logging.getLevelName(level)} instead.", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)
    sys.stderr.flush()


def install_fallback(level: int, logfile: str | None = None,
                     format: str | None = None) -> logging.Handler:
    """Make the root logger usable whatever a failed hook left behind."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler = (logging.FileHandler(logfile) if logfile
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter(format or FALLBACK_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # A half-applied dictConfig may have disabled the loggers that existed.
    for logger in logging.Logger.manager.loggerDict.values():
        if isinstance(logger, logging.Logger):
            logger.disabled = False
    return handler


def install_context_filter(alias: str | None = None) -> None:
    """Give every configured handler a :class:`TaskContextFilter` (once)."""
    context = TaskContextFilter(alias)
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, TaskContextFilter) for f in handler.filters):
                handler.addFilter(context)


def _delegate_to_celery(alias: str | None, loglevel: Any, logfile: str | None,
                        format: str | None, colorize: bool | None) -> None:
    # Celery runs its own setup only when no receiver is connected. Leave, and
    # run the setup again with us gone: the nested call finds no receiver (unless
    # the project connected its own, which then has done its work already).
    from .registry import apps

    disconnect()
    if signals.setup_logging.receivers:
        return
    if alias and alias in conf.app_settings():
        app = apps[alias]
    else:
        from celery import current_app as app
    app.log.already_setup = False
    app.log.setup_logging_subsystem(loglevel, logfile, format, colorize)


def _has_app_key(alias: str) -> bool:
    app = conf.app_settings().get(alias)
    return isinstance(app, Mapping) and APP_LOGGING_KEY in app


def _level(loglevel: int | str | None) -> int:
    if isinstance(loglevel, int):
        return loglevel
    if isinstance(loglevel, str):
        level = logging.getLevelName(loglevel.upper())
        if isinstance(level, int):
            return level
    return logging.INFO


# -- ready-made pieces ------------------------------------------------------------

def json_formatter(fields: tuple[str, ...] | list[str] = JSON_FIELDS,
                   **options: Any) -> dict[str, Any]:
    """A dictConfig formatter entry writing one JSON object per record.

    Uses python-json-logger; ``options`` go to its ``JsonFormatter`` (e.g.
    ``rename_fields={"levelname": "level"}``, ``static_fields={"service": "x"}``).
    """
    return {"()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": " ".join(f"%({field})s" for field in fields), **options}


def syslog_logging(address: str | tuple[str, int] = "/dev/log", *,
                   facility: str = "user", level: str | None = None,
                   json: bool = False, console: bool = True,
                   format: str = SYSLOG_FORMAT) -> dict[str, Any]:
    """A complete ``LOGGING`` dict: every record to syslog (and to the console).

    ``address`` is ``(host, port)`` for UDP or a socket path such as
    ``"/dev/log"``; ``facility`` a syslog facility name (``"local0"``...).
    ``level=None`` keeps the worker's ``-l`` level. ``json=True`` sends JSON
    objects (see :func:`json_formatter`) instead of ``format``.
    """
    handlers: dict[str, Any] = {
        "syslog": {
            "class": "logging.handlers.SysLogHandler",
            "address": address if isinstance(address, str) else tuple(address),
            "facility": facility,
            "formatter": "json" if json else "syslog",
            "filters": ["task_context"],
        },
    }
    if console:
        handlers["console"] = {
            "class": "logging.StreamHandler",
            "formatter": "console",
            "filters": ["task_context"],
        }
    formatters: dict[str, Any] = {
        "syslog": {"format": format},
        "console": {"format": "[%(asctime)s: %(levelname)s/%(processName)s] "
                              "[%(alias)s %(task_name)s %(task_id)s] %(message)s"},
    }
    if json:
        formatters["json"] = json_formatter()
    root: dict[str, Any] = {"handlers": list(handlers)}
    if level is not None:
        root["level"] = level
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"task_context": {"()": "django_celery_adv.logconfig.TaskContextFilter"}},
        "formatters": formatters,
        "handlers": handlers,
        "root": root,
    }
