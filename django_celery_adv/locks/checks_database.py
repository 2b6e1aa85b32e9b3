"""System check W010: the database lock backend on a database it does not support.

What the database backend guarantees, per database, is in the docstring of
:mod:`django_celery_adv.locks.backends.database`. This check warns, for every
``LOCK_BACKENDS`` alias served by it, when the ``using`` database is outside
that: another engine than PostgreSQL, MariaDB/MySQL or SQLite; ``USE_TZ =
False``; an in-memory SQLite database (no lock is shared with another
process) or a SQLite library older than 3.35 (no ``RETURNING``); MariaDB/MySQL
with a ``TIME_ZONE`` other than UTC (expiry compares ``UTC_TIMESTAMP``) or, when
the check may query the database (``check --database``), lock tables on a
storage engine other than InnoDB (no transactions, no row locks).

The isolation level configured for the alias needs no warning: the backend
runs its statements on its own READ COMMITTED connection whatever it is.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Warning
from django.db import DatabaseError, connections, router
from django.db.utils import ConnectionDoesNotExist
from django.utils.module_loading import import_string
from django.utils.translation import gettext as _

from .. import conf

CHECK_ID = "django_celery_adv.W010"
SUPPORTED = ("postgresql", "mysql", "sqlite")


def check_database_lock_backend(app_configs: Any = None, databases: Iterable[str] | None = None,
                                **kwargs: Any) -> list[CheckMessage]:
    """W010 for each database lock backend on an unsupported database."""
    from ..models import LockFence, LockLease
    from .backends.database import DatabaseBackend

    messages: list[CheckMessage] = []
    for alias, params in conf.lock_backend_settings().items():
        if not _is_database_backend(params, DatabaseBackend):
            continue
        using = (params.get("OPTIONS") or {}).get("using") or router.db_for_write(LockLease)
        try:
            connections[using]
        except ConnectionDoesNotExist:
            continue  # not a database problem: the backend reports the unknown alias
        obj = f"CELERY_ADV['LOCK_BACKENDS'][{alias!r}]"
        for problem in _problems(using, querying=using in (databases or ()),
                                 tables=(LockFence, LockLease)):
            messages.append(Warning(
                _("The database lock backend %(alias)s runs on DATABASES[%(using)s]: "
                  "%(problem)s.") % {"alias": repr(alias), "using": repr(using),
                                     "problem": problem},
                hint=_("See the support matrix in django_celery_adv.locks.backends.database "
                       "(PostgreSQL, MariaDB/MySQL on InnoDB, SQLite >= 3.35 on a file, "
                       "USE_TZ = True), or use another lock backend."),
                obj=obj, id=CHECK_ID))
    return messages


def _is_database_backend(params: Any, base: type) -> bool:
    path = params.get("BACKEND") if isinstance(params, dict) else None
    if not isinstance(path, str):
        return False  # E010 reports it
    try:
        backend_cls = import_string(path)
    except ImportError:
        return False  # E011 reports it
    return isinstance(backend_cls, type) and issubclass(backend_cls, base)


def _problems(using: str, *, querying: bool, tables: tuple) -> list[str]:
    connection = connections[using]
    vendor = connection.vendor
    if vendor not in SUPPORTED:
        return [_("%(vendor)s is not supported (no fence upsert, no server clock for expiry)")
                % {"vendor": vendor}]
    problems = []
    if not settings.USE_TZ:
        problems.append(_("USE_TZ is False (lease times are stored and compared in UTC)"))
    if vendor == "sqlite":
        if connection.is_in_memory_db():
            problems.append(_("an in-memory SQLite database is private to one process, "
                              "so no lock is shared with another worker"))
        if sqlite3.sqlite_version_info < (3, 35):
            problems.append(_("SQLite %(version)s lacks RETURNING (3.35+)")
                            % {"version": sqlite3.sqlite_version})
    if vendor == "mysql":
        zone = connection.settings_dict.get("TIME_ZONE")
        if zone not in (None, "UTC"):
            problems.append(_("TIME_ZONE %(zone)s: expiry compares UTC_TIMESTAMP with "
                              "stored times, which must be UTC") % {"zone": repr(zone)})
        if querying:
            problems.extend(_storage_engine_problems(connection, tables))
    return problems


def _storage_engine_problems(connection: Any, tables: tuple) -> list[str]:
    names = [model._meta.db_table for model in tables]
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT TABLE_NAME, ENGINE FROM information_schema.TABLES WHERE "
                "TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN (%s, %s)", names)
            rows = cursor.fetchall()
    except DatabaseError:
        return []  # an unreachable database is reported by Django's own checks
    return [_("table %(table)s uses the %(engine)s storage engine, not InnoDB "
              "(no transactions or row locks)") % {"table": table, "engine": engine}
            for table, engine in rows
            if str(engine).lower() != "innodb"]
