"""System checks for ``CELERY_ADV``: every mistake is a message with a stable id.

Ids are never reused:

======  ==============================================================
E001    ``CELERY_ADV`` is not a dict
E002    unknown key in ``CELERY_ADV``
E003    ``APPS`` missing, not a dict, or without a ``default`` alias
E004    an app's settings are not a dict or lack ``broker_url``
E005    an app's broker URL has a scheme no kombu transport handles
E006    ``TASK_APPS`` is malformed or names an unknown alias
E007    the client library of an app's broker transport is not installed
E008    two apps on one broker share a control exchange (cross-talk)
E009    two apps on one broker share a default queue (stolen tasks)
E010    ``LOCK_BACKENDS`` missing ``default``, or an entry is malformed
E011    a lock backend's ``BACKEND`` cannot be imported
E012    a lock backend lacks a required option
E013    ``LOCK_DEFAULTS`` has an unknown key or a bad value
E014    ``LOGGING`` (global, or an app's own) is not None, a dict, or an
        importable callable
E015    ``INSPECT_TIMEOUT``, ``RECORD_FAILURES`` or
        ``FAILURE_RETENTION_DAYS`` has a bad value
E016    the kombu transport of an app's broker cannot be imported (a
        module it needs is missing: the worker would die at start-up)
E017    ``MONITORING`` is not a dict or has an unknown key
E018    a ``MONITORING`` value is out of range (negative, a page size
        outside 10-1000, a window longer than ``FORGET_AFTER``)
E019    ``METRICS`` is not a dict, has an unknown key, a ``TOKEN`` that
        is not None or a string of at least 16 characters, or a
        ``SERVER_TIMEOUT`` or ``HISTOGRAM_WINDOW`` that is not a number of
        seconds > 0
E020    ``BEAT`` is not a dict or has an unknown key
E021    a ``BEAT`` ``LOCK_BACKEND`` (global or an app's override) is
        not an alias of ``LOCK_BACKENDS``
E022    a ``BEAT`` ``TTL`` is not a number of seconds >= 1 (the beat
        ticks every TTL/4)
E023    a ``BEAT`` ``MISFIRE_GRACE`` is not None, seconds >= 0, or a
        ``{periodic task name glob: seconds}`` dict of those
E024    a ``BEAT`` ``ON_BUSY`` is not "skip" or "send"
E025    ``BEAT["APPS"]`` is not a dict, names an alias missing from
        ``APPS``, or an entry is not a dict of ``LOCK_BACKEND``,
        ``TTL``, ``MISFIRE_GRACE`` and ``ON_BUSY`` overrides
E026    ``EVENTS`` (or its ``APPS`` map) is not a dict, has an unknown
        key, or names an alias missing from ``APPS``
E027    an ``EVENTS`` value (global or an app's override) is not a number
        at or above its minimum (``MAX_PENDING`` >= 100, the rest >= 0;
        the retention limits may be None)
W001    an app sets a key that is not a Celery setting (a typo?); its
        ``LOGGING`` key is this library's, not Celery's
======  ==============================================================

Checks read settings only: they build no Celery app and open no connection.
The one import they make is that of each broker URL's kombu transport module
(E016), exactly what a worker imports first, so a missing requirement is
reported by ``manage.py check`` instead of killing the worker.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.utils.module_loading import import_string
from django.utils.translation import gettext as _

from . import conf
from .exceptions import InvalidLockBackendError
from .locks.backends import load_backend_class, pip_extra_for
from .logconfig import APP_LOGGING_KEY
from .registry import isolation_defaults

ID = "django_celery_adv.{}"

#: Broker URL scheme -> this package's extra that brings its kombu transport's requirements.
TRANSPORT_EXTRAS = {"redis": "redis", "rediss": "redis", "sentinel": "redis",
                    "mongodb": "mongodb", "zookeeper": "zookeeper",
                    "amqp": "amqp", "amqps": "amqp", "pyamqp": "amqp"}


def install_hint(scheme: str) -> str:
    """The pip install that brings what the ``scheme`` transport needs."""
    if scheme in TRANSPORT_EXTRAS:
        return f"pip install 'django-celery-adv[{TRANSPORT_EXTRAS[scheme]}]'"
    # kombu names its extras after the transport's client (sqla -> kombu[sqlalchemy]).
    return f"pip install 'kombu[{TRANSPORT_CLIENTS.get(scheme, scheme)}]'"


#: kombu transport -> the client library it imports lazily (kombu only fails on first use).
TRANSPORT_CLIENTS = {
    "redis": "redis", "rediss": "redis", "sentinel": "redis", "mongodb": "pymongo",
    "sqla": "sqlalchemy", "sqlalchemy": "sqlalchemy", "zookeeper": "kazoo",
    "librabbitmq": "librabbitmq",
}
DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "amqp": 5672, "amqps": 5671,
                 "pyamqp": 5672, "mongodb": 27017}
AMQP_SCHEMES = {"amqp", "amqps", "pyamqp", "librabbitmq"}


def _error(number: str, msg: str, hint: str | None = None, obj: str = "CELERY_ADV") -> Error:
    return Error(msg, hint=hint, obj=obj, id=ID.format(number))


@register(Tags.compatibility)
def check_celery_adv_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    raw = conf.user_settings()
    if not isinstance(raw, dict):
        return [_error("E001", _("CELERY_ADV must be a dict, not %(type)s.")
                       % {"type": type(raw).__name__},
                       hint=_("See the Settings section of the README."))]
    messages: list[CheckMessage] = []
    for key in sorted(set(raw) - set(conf.DEFAULTS)):
        messages.append(_error(
            "E002", _("CELERY_ADV has an unknown key %(key)s.") % {"key": repr(key)},
            hint=_("Known keys: %(keys)s.") % {"keys": ", ".join(sorted(conf.DEFAULTS))},
        ))
    config = conf.get_config()
    messages += check_apps(config["APPS"])
    messages += check_task_apps(config["TASK_APPS"], config["APPS"])
    messages += check_lock_backends(config["LOCK_BACKENDS"])
    messages += check_lock_defaults(config["LOCK_DEFAULTS"])
    messages += check_logging(config["LOGGING"])
    messages += check_scalars(config)
    messages += check_monitoring(raw.get("MONITORING", {}))
    messages += check_metrics(raw.get("METRICS", {}))
    return messages


# -- APPS -------------------------------------------------------------------

def broker_urls(app_settings: Mapping[str, Any]) -> list[str]:
    """The URLs of ``broker_url``: a list, or a string of ``;``-separated failovers."""
    value = app_settings.get("broker_url")
    if isinstance(value, str):
        return [part.strip() for part in value.split(";") if part.strip()]
    if isinstance(value, list | tuple):
        return [str(part) for part in value]
    return []


def transport_of(url: str) -> str:
    """``sqla+sqlite://`` -> ``sqla``: the part kombu picks a transport by."""
    return url.partition("://")[0].partition("+")[0].lower()


def check_apps(app_settings: Any) -> list[CheckMessage]:
    if not isinstance(app_settings, dict) or not app_settings:
        return [_error("E003", _("CELERY_ADV['APPS'] must be a non-empty dict of alias -> "
                                 "Celery settings."),
                       hint=_("e.g. %(example)s")
                       % {"example": "{'default': {'broker_url': 'redis://127.0.0.1:6379/0'}}"})]
    messages: list[CheckMessage] = []
    if conf.DEFAULT_APP_ALIAS not in app_settings:
        messages.append(_error(
            "E003", _("CELERY_ADV['APPS'] has no 'default' alias."),
            hint=_("Shared tasks with no TASK_APPS match are sent through 'default'; add it."),
        ))
    valid: dict[str, Mapping[str, Any]] = {}
    for alias, settings in app_settings.items():
        obj = f"CELERY_ADV['APPS'][{alias!r}]"
        if isinstance(settings, dict):
            messages += _check_setting_names(obj, settings)
            if APP_LOGGING_KEY in settings:
                messages += check_logging(settings[APP_LOGGING_KEY],
                                          f"{obj}[{APP_LOGGING_KEY!r}]", obj)
        if not isinstance(settings, dict) or not broker_urls(settings):
            messages.append(_error(
                "E004", _("%(obj)s has no 'broker_url'.") % {"obj": obj},
                hint=_("Each app needs its own broker_url (lowercase Celery setting names)."),
                obj=obj))
            continue
        url_errors = _check_broker_urls(obj, broker_urls(settings))
        messages += url_errors
        if not url_errors:
            valid[alias] = settings
    messages += _check_shared_brokers(valid)
    return messages


def _check_setting_names(obj: str, settings: Mapping[str, Any]) -> list[CheckMessage]:
    from celery.app.defaults import DEFAULTS as CELERY_DEFAULTS

    messages: list[CheckMessage] = []
    for key in sorted(settings):
        if key not in CELERY_DEFAULTS and key != APP_LOGGING_KEY:
            messages.append(Warning(
                _("%(obj)s sets %(key)s, which is not a Celery setting; it is ignored.")
                % {"obj": obj, "key": repr(key)},
                hint=_("Use Celery's lowercase setting names, e.g. 'broker_url', "
                       "'result_backend', 'task_default_queue'."),
                obj=obj, id=ID.format("W001")))
    return messages


def _check_broker_urls(obj: str, urls: Iterable[str]) -> list[CheckMessage]:
    from kombu.transport import TRANSPORT_ALIASES

    messages: list[CheckMessage] = []
    for url in urls:
        scheme = transport_of(url)
        if "://" not in url or scheme not in TRANSPORT_ALIASES:
            messages.append(_error(
                "E005", _("%(obj)s has a broker URL with an unsupported scheme %(scheme)s.")
                % {"obj": obj, "scheme": repr(scheme)},
                hint=_("Use one of kombu's transports: %(transports)s.")
                % {"transports": ", ".join(sorted(TRANSPORT_ALIASES))},
                obj=obj))
            continue
        try:
            urlsplit(url).port  # noqa: B018 (raises on a port that is not a number)
        except ValueError as e:
            messages.append(_error("E005", _("%(obj)s has a malformed broker URL: %(error)s.")
                                   % {"obj": obj, "error": e},
                                   hint=_("Check the host and port of broker_url."), obj=obj))
            continue
        client = TRANSPORT_CLIENTS.get(scheme)
        if client and importlib.util.find_spec(client) is None:
            messages.append(_error(
                "E007", _("%(obj)s uses the %(scheme)s transport but %(client)s is not "
                          "installed.") % {"obj": obj, "scheme": repr(scheme),
                                           "client": repr(client)},
                hint=install_hint(scheme), obj=obj))
            continue  # the transport's import would fail for the same reason
        messages += _check_transport_imports(obj, scheme)
    return messages


def _check_transport_imports(obj: str, scheme: str) -> list[CheckMessage]:
    """E016 if kombu's transport for ``scheme`` cannot be imported, as a worker would."""
    from kombu.transport import resolve_transport

    try:
        resolve_transport(scheme)
    except ImportError as e:
        # "packaging", also when the import of "packaging.version" was the one refused.
        missing = (e.name or str(e)).partition(".")[0]
        return [_error(
            "E016", _("%(obj)s uses the %(scheme)s transport, which cannot be imported: "
                      "the module %(module)s is missing (%(error)s). A worker would die at "
                      "start-up.") % {"obj": obj, "scheme": repr(scheme),
                                      "module": repr(missing), "error": e},
            hint=install_hint(scheme), obj=obj)]
    return []


def broker_identity(settings: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes two apps' brokers the same server, vhost or database."""
    url = broker_urls(settings)[0]
    scheme = transport_of(url)
    if scheme == "filesystem":
        options = settings.get("broker_transport_options") or {}
        return (scheme, options.get("control_folder"), options.get("data_folder_in"))
    if scheme == "memory":
        return (scheme,)
    parts = urlsplit(url)
    host = (parts.hostname or "localhost").lower()
    if host == "localhost":
        host = "127.0.0.1"
    port = parts.port or DEFAULT_PORTS.get(scheme)
    # The amqp vhost is the path after the first slash, %-encoded ("//" and "/%2F": "/").
    path = unquote(parts.path[1:]) if scheme in AMQP_SCHEMES else parts.path.strip("/")
    if scheme in AMQP_SCHEMES:
        scheme, path = "amqp", path or "/"
    elif scheme in ("redis", "rediss"):
        path = path or "0"
    return (scheme, host, port, path)


def _check_shared_brokers(app_settings: Mapping[str, Mapping[str, Any]]) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    seen: dict[tuple[Any, ...], list[str]] = {}
    for alias, settings in app_settings.items():
        seen.setdefault(broker_identity(settings), []).append(alias)
    for aliases in seen.values():
        for setting, number, text in (
            ("control_exchange", "E008", _(
                "Apps %(apps)s share a broker and the %(setting)s %(name)s: their workers "
                "would answer each other's inspect/control broadcasts.")),
            ("task_default_queue", "E009", _(
                "Apps %(apps)s share a broker and the %(setting)s %(name)s: their workers "
                "would consume each other's tasks.")),
        ):
            by_name: dict[str, list[str]] = {}
            for alias in aliases:
                effective = app_settings[alias].get(setting) or \
                    isolation_defaults(alias).get(setting, "celery")
                by_name.setdefault(str(effective), []).append(alias)
            for name, clash in by_name.items():
                if len(clash) > 1:
                    messages.append(_error(
                        number,
                        text % {"apps": ", ".join(map(repr, clash)), "setting": setting,
                                "name": repr(name)},
                        hint=_("Give each app its own %(setting)s; left unset, every alias "
                               "but 'default' gets one named after it.")
                        % {"setting": repr(setting)},
                        obj=f"CELERY_ADV['APPS'][{clash[1]!r}]"))
    return messages


# -- TASK_APPS --------------------------------------------------------------

def check_task_apps(task_apps: Any, app_settings: Any) -> list[CheckMessage]:
    if not isinstance(task_apps, dict):
        return [_error("E006", _("CELERY_ADV['TASK_APPS'] must be a dict of task-name glob "
                                 "-> app alias."),
                       hint=_("e.g. %(example)s") % {"example": "{'reports.tasks.*': 'global'}"})]
    known = set(app_settings) if isinstance(app_settings, dict) else set()
    return [
        _error("E006", _("CELERY_ADV['TASK_APPS'][%(pattern)s] names the unknown app "
                         "%(alias)s.") % {"pattern": repr(pattern), "alias": repr(alias)},
               hint=_("Known apps: %(apps)s.") % {"apps": ", ".join(sorted(known)) or _("none")})
        for pattern, alias in task_apps.items() if not isinstance(alias, str) or alias not in known
    ]


# -- LOCK_BACKENDS ----------------------------------------------------------

def check_lock_backends(backends: Any) -> list[CheckMessage]:
    if not isinstance(backends, dict) or conf.DEFAULT_LOCK_BACKEND_ALIAS not in backends:
        return [_error("E010", _("CELERY_ADV['LOCK_BACKENDS'] must be a dict with a 'default' "
                                 "alias."),
                       hint=_("The embedded default is %(backend)s.")
                       % {"backend": repr(conf.DATABASE_LOCK_BACKEND)})]
    messages: list[CheckMessage] = []
    for alias, params in backends.items():
        obj = f"CELERY_ADV['LOCK_BACKENDS'][{alias!r}]"
        if not isinstance(params, dict) or not isinstance(params.get("BACKEND"), str):
            messages.append(_error("E010", _("%(obj)s needs a 'BACKEND' dotted path.")
                                   % {"obj": obj},
                                   hint=_("And optionally 'OPTIONS': {...}."), obj=obj))
            continue
        try:
            backend_cls = load_backend_class(params["BACKEND"])
        except InvalidLockBackendError as e:
            extra = pip_extra_for(params["BACKEND"])
            hint = (f"pip install 'django-celery-adv[{extra}]'" if extra
                    else _("Check the dotted path of the LockBackend subclass."))
            messages.append(_error("E011", str(e), hint=hint, obj=obj))
            continue
        options = params.get("OPTIONS") or {}
        if not isinstance(options, dict):
            messages.append(_error("E010", _("%(obj)s['OPTIONS'] must be a dict.")
                                   % {"obj": obj}, obj=obj))
            continue
        missing = [name for name in backend_cls.required_options if name not in options]
        if missing:
            messages.append(_error(
                "E012", _("%(obj)s lacks the required option(s) %(options)s.")
                % {"obj": obj, "options": ", ".join(map(repr, missing))},
                hint=_("%(backend)s needs OPTIONS with: %(options)s.")
                % {"backend": backend_cls.__name__,
                   "options": ", ".join(backend_cls.required_options)}, obj=obj))
    return messages


def check_lock_defaults(defaults: Any) -> list[CheckMessage]:
    """Each ``LOCK_DEFAULTS`` value must pass the validators of the model field it fills.

    One source of bounds: ``LockDefinition``'s fields (``LOCK_DEFAULT_FIELDS``)
    and their validators, so a setting the check accepts is a value the admin
    would save, and the reverse.
    """
    from .models import LOCK_DEFAULT_FIELDS, LockDefinition

    obj = "CELERY_ADV['LOCK_DEFAULTS']"
    if not isinstance(defaults, dict):
        return [_error("E013", _("%(obj)s must be a dict.") % {"obj": obj}, obj=obj)]
    messages = [_error("E013", _("%(obj)s has an unknown key %(key)s.")
                       % {"obj": obj, "key": repr(key)},
                       hint=_("Known keys: %(keys)s.")
                       % {"keys": ", ".join(sorted(LOCK_DEFAULT_FIELDS))}, obj=obj)
                for key in sorted(set(defaults) - set(LOCK_DEFAULT_FIELDS))]
    for key, field_name in LOCK_DEFAULT_FIELDS.items():
        if key in defaults:
            field = LockDefinition._meta.get_field(field_name)
            problem = _field_problem(field, defaults[key])
            if problem:
                messages.append(_error("E013", _("%(obj)s[%(key)s] is %(value)s: %(problem)s")
                                       % {"obj": obj, "key": repr(key),
                                          "value": repr(defaults[key]), "problem": problem},
                                       obj=obj))
    return messages


def _field_problem(field: Any, value: Any) -> str | None:
    """Why ``value`` fails ``field``'s type or validators (the admin's words); None if not."""
    from django.core.exceptions import ValidationError
    from django.db import models

    if isinstance(field, models.BooleanField):
        return None if isinstance(value, bool) else _("expected True or False.")
    if value is None and field.null:
        return None
    integer = isinstance(field, models.IntegerField)
    if isinstance(value, bool) or not (isinstance(value, int) if integer else _number(value)):
        if integer:
            return _("expected None (forever) or an int.") if field.null \
                else _("expected an int.")
        return _("expected None (forever) or a number of seconds.") if field.null \
            else _("expected a number of seconds.")
    try:
        field.run_validators(value)
    except ValidationError as e:
        return " ".join(e.messages)
    return None


# -- LOGGING and scalars ------------------------------------------------------

def check_logging(value: Any, name: str = "CELERY_ADV['LOGGING']",
                  obj: str = "CELERY_ADV") -> list[CheckMessage]:
    if value is None or isinstance(value, dict):
        return []
    if isinstance(value, str):
        try:
            if callable(import_string(value)):
                return []
        except ImportError as e:
            return [_error("E014", _("%(name)s %(value)s cannot be imported: %(error)s.")
                           % {"name": name, "value": repr(value), "error": e},
                           hint=_("Give the dotted path of a callable."), obj=obj)]
    return [_error("E014", _("%(name)s must be None, a logging dictConfig dict, "
                             "or the dotted path of a callable.") % {"name": name}, obj=obj)]


def check_scalars(config: Mapping[str, Any]) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    timeout = config["INSPECT_TIMEOUT"]
    if not (_number(timeout) and timeout > 0):
        messages.append(_error("E015", _("CELERY_ADV['INSPECT_TIMEOUT'] is %(value)s; "
                                         "expected a number of seconds > 0.")
                               % {"value": repr(timeout)}))
    if not isinstance(config["RECORD_FAILURES"], bool):
        messages.append(_error("E015", _("CELERY_ADV['RECORD_FAILURES'] must be True or "
                                         "False.")))
    days = config["FAILURE_RETENTION_DAYS"]
    if not (isinstance(days, int) and not isinstance(days, bool) and days >= 1):
        messages.append(_error("E015", _("CELERY_ADV['FAILURE_RETENTION_DAYS'] is %(value)s; "
                                         "expected an int >= 1.") % {"value": repr(days)}))
    return messages


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_monitoring(value: Any) -> list[CheckMessage]:
    """E017/E018 for ``MONITORING`` as the project wrote it."""
    defaults = conf.DEFAULTS["MONITORING"]
    where = "CELERY_ADV['MONITORING']"
    if not isinstance(value, dict):
        return [_error("E017", _("%(obj)s must be a dict, not %(type)s.")
                       % {"obj": where, "type": type(value).__name__})]
    messages = [_error("E017", _("%(obj)s has an unknown key %(key)s.")
                       % {"obj": where, "key": repr(key)},
                       hint=_("Known keys: %(keys)s.") % {"keys": ", ".join(sorted(defaults))})
                for key in sorted(set(value) - set(defaults))]
    merged = {**defaults, **{k: v for k, v in value.items() if k in defaults}}
    for key in sorted(set(value) & set(defaults)):
        if not (_number(value[key]) and value[key] >= 0):
            messages.append(_error("E018", _("%(obj)s['%(key)s'] is %(value)s; expected a "
                                             "number >= 0.")
                                   % {"obj": where, "key": key, "value": repr(value[key])}))
    if any(m.id.endswith("E018") for m in messages):
        return messages
    size = merged["PAGE_SIZE"]
    if not (isinstance(size, int) and 10 <= size <= 1000):
        messages.append(_error("E018", _("%(obj)s['PAGE_SIZE'] is %(value)s; expected an int "
                                         "from 10 to 1000.") % {"obj": where, "value": repr(size)}))
    if merged["NEWCOMER_GRACE"] > 1:
        messages.append(_error("E018", _("%(obj)s['NEWCOMER_GRACE'] is %(value)s; expected "
                                         "at most 1 s (every reading of a healthy fleet waits "
                                         "it).") % {"obj": where,
                                                    "value": repr(merged["NEWCOMER_GRACE"])}))
    for key in ("SILENT_WINDOW", "OFFLINE_AFTER"):
        if merged[key] > merged["FORGET_AFTER"]:
            messages.append(_error("E018", _("%(obj)s['%(key)s'] (%(value)s) is longer than "
                                             "FORGET_AFTER (%(forget)s): the worker would be "
                                             "forgotten first.")
                                   % {"obj": where, "key": key, "value": repr(merged[key]),
                                      "forget": repr(merged["FORGET_AFTER"])}))
    return messages


#: A bearer token shorter than this is refused (E019): it could be guessed.
METRICS_TOKEN_MIN_LENGTH = 16


def check_metrics(value: Any) -> list[CheckMessage]:
    """E019 for ``METRICS`` as the project wrote it (never echoes the token)."""
    defaults = conf.DEFAULTS["METRICS"]
    where = "CELERY_ADV['METRICS']"
    if not isinstance(value, dict):
        return [_error("E019", _("%(obj)s must be a dict, not %(type)s.")
                       % {"obj": where, "type": type(value).__name__})]
    messages = [_error("E019", _("%(obj)s has an unknown key %(key)s.")
                       % {"obj": where, "key": repr(key)},
                       hint=_("Known keys: %(keys)s.") % {"keys": ", ".join(sorted(defaults))})
                for key in sorted(set(value) - set(defaults))]
    token = value.get("TOKEN")
    if token is not None and not (isinstance(token, str)
                                  and len(token.strip()) >= METRICS_TOKEN_MIN_LENGTH):
        messages.append(_error(
            "E019", _("%(obj)s['TOKEN'] must be None or a string of at least %(length)d "
                      "characters.") % {"obj": where, "length": METRICS_TOKEN_MIN_LENGTH},
            hint=_("e.g. %(example)s") % {
                "example": "os.environ['CELERY_ADV_METRICS_TOKEN'], made with python -c "
                           "'import secrets; print(secrets.token_urlsafe(32))'."}))
    for key in ("SERVER_TIMEOUT", "HISTOGRAM_WINDOW"):
        seconds = value.get(key, defaults[key])
        if not (_number(seconds) and seconds > 0):
            messages.append(_error("E019", _("%(obj)s['%(key)s'] is %(value)s; expected a "
                                             "number of seconds > 0.")
                                   % {"obj": where, "key": key, "value": repr(seconds)}))
    return messages


# -- BEAT (django_celery_adv.beat) -------------------------------------------------
# E020 BEAT is not a dict or has an unknown key; E021 its LOCK_BACKEND is not a
# LOCK_BACKENDS alias; E022 TTL is not a number >= 1; E023 MISFIRE_GRACE is not
# None, a number >= 0 or a {glob: number} dict; E024 ON_BUSY is not skip/send;
# E025 APPS is not a dict, or names an unknown app, or an entry with a bad key.

@register(Tags.compatibility)
def check_beat_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    raw = conf.user_settings()
    beat = raw.get("BEAT", {}) if isinstance(raw, dict) else {}
    defaults = conf.DEFAULTS["BEAT"]
    if not isinstance(beat, dict):
        return [_error("E020", _("%(obj)s must be a dict, not %(type)s.")
                       % {"obj": "CELERY_ADV['BEAT']", "type": type(beat).__name__})]
    messages = [_error("E020", _("%(obj)s has an unknown key %(key)s.")
                       % {"obj": "CELERY_ADV['BEAT']", "key": repr(key)},
                       hint=_("Known keys: %(keys)s.") % {"keys": ", ".join(sorted(defaults))})
                for key in sorted(set(beat) - set(defaults))]
    per_app = beat.get("APPS", {})
    if not isinstance(per_app, dict):
        return [*messages, _error("E025", _("CELERY_ADV['BEAT']['APPS'] must be a dict of "
                                            "app alias -> beat settings."))]
    # Only what the project wrote: a missing "default" lock backend is E010's to report.
    sections = [("CELERY_ADV['BEAT']", beat)]
    for alias, overrides in per_app.items():
        where = f"CELERY_ADV['BEAT']['APPS'][{alias!r}]"
        if alias not in conf.app_settings():
            messages.append(_error("E025", _("%(obj)s: no app %(alias)s in CELERY_ADV['APPS'].")
                                   % {"obj": where, "alias": repr(alias)}))
        if not isinstance(overrides, dict) or set(overrides) - (set(defaults) - {"APPS"}):
            messages.append(_error("E025", _("%(obj)s must be a dict of LOCK_BACKEND, TTL, "
                                             "MISFIRE_GRACE and ON_BUSY overrides.")
                                   % {"obj": where}))
        elif overrides:
            sections.append((where, overrides))
    for where, values in sections:
        if "LOCK_BACKEND" in values and values["LOCK_BACKEND"] not in \
                conf.lock_backend_settings():
            messages.append(_error("E021", _("%(obj)s['LOCK_BACKEND'] is %(value)s, not a lock "
                                             "backend of CELERY_ADV['LOCK_BACKENDS'].")
                                   % {"obj": where, "value": repr(values["LOCK_BACKEND"])}))
        if "TTL" in values and not (_number(values["TTL"]) and values["TTL"] >= 1):
            messages.append(_error("E022", _("%(obj)s['TTL'] is %(value)s; expected seconds "
                                             ">= 1 (the beat ticks every TTL/4).")
                                   % {"obj": where, "value": repr(values["TTL"])}))
        grace = values.get("MISFIRE_GRACE")
        graces = grace.values() if isinstance(grace, dict) else [grace]
        if not all(g is None or (_number(g) and g >= 0) for g in graces):
            messages.append(_error("E023", _("%(obj)s['MISFIRE_GRACE'] is %(value)s; expected "
                                             "None, seconds >= 0, or {name glob: seconds}.")
                                   % {"obj": where, "value": repr(grace)}))
        if values.get("ON_BUSY", "skip") not in ("skip", "send"):
            messages.append(_error("E024", _("%(obj)s['ON_BUSY'] is %(value)s; expected "
                                             "'skip' or 'send'.")
                                   % {"obj": where, "value": repr(values["ON_BUSY"])}))
    return messages


# -- EVENTS (django_celery_adv.events) ---------------------------------------------

#: EVENTS key -> (smallest value, whether None is allowed).
_EVENTS_LIMITS = {"RETENTION_DAYS": (0, True), "RETENTION_COUNT": (0, True),
                  "MAX_PENDING": (100, False), "ENABLE_EVENTS_INTERVAL": (0, False),
                  "QUEUE_EXPIRES": (0, False), "PRUNE_INTERVAL": (0, False)}


@register(Tags.compatibility)
def check_events_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """E026 for the shape of ``EVENTS``, E027 for its values (global and per app)."""
    raw = conf.user_settings()
    value = raw.get("EVENTS", {}) if isinstance(raw, dict) else {}
    where = "CELERY_ADV['EVENTS']"
    if not isinstance(value, dict):
        return [_error("E026", _("%(obj)s must be a dict, not %(type)s.")
                       % {"obj": where, "type": type(value).__name__})]
    known = set(_EVENTS_LIMITS) | {"APPS"}
    messages = [_error("E026", _("%(obj)s has an unknown key %(key)s.")
                       % {"obj": where, "key": repr(key)},
                       hint=_("Known keys: %(keys)s.") % {"keys": ", ".join(sorted(known))})
                for key in sorted(set(value) - known)]
    sections = [(where, value)]
    per_app = value.get("APPS", {})
    if not isinstance(per_app, dict):
        messages.append(_error("E026", _("%(obj)s['APPS'] must be a dict of app alias -> "
                                         "overrides.") % {"obj": where}))
        per_app = {}
    for alias, overrides in per_app.items():
        app_where = f"{where}['APPS'][{alias!r}]"
        if alias not in conf.app_settings():
            messages.append(_error("E026", _("%(obj)s: no app %(alias)s in CELERY_ADV['APPS'].")
                                   % {"obj": app_where, "alias": repr(alias)}))
        if not isinstance(overrides, dict) or set(overrides) - set(_EVENTS_LIMITS):
            messages.append(_error("E026", _("%(obj)s must be a dict of %(keys)s overrides.")
                                   % {"obj": app_where,
                                      "keys": ", ".join(sorted(_EVENTS_LIMITS))}))
        else:
            sections.append((app_where, overrides))
    for obj, values in sections:
        for key, (smallest, nullable) in _EVENTS_LIMITS.items():
            if key not in values or (nullable and values[key] is None):
                continue
            if not (_number(values[key]) and values[key] >= smallest):
                messages.append(_error(
                    "E027", _("%(obj)s['%(key)s'] is %(value)s; expected a number >= "
                              "%(min)s%(none)s.")
                    % {"obj": obj, "key": key, "value": repr(values[key]), "min": smallest,
                       "none": _(" or None") if nullable else ""}))
    return messages
