"""The database lock backend's own connection gives up on a server that stops
answering (review finding: an acquire hung for good behind a cut-off link).

The proxy's blackhole keeps acknowledging TCP, as a paused server's kernel
does: only an application-level read timeout ends that wait. PyMySQL has one;
libpq has none (its ``tcp_user_timeout`` and keepalives end a wait on a link
that stops acknowledging, a partition, which the proxy cannot fake), so the
PostgreSQL case checks that those options reach the connection."""

from __future__ import annotations

import time

import pymysql
import pytest
from django.db import OperationalError, connections

from django_celery_adv.locks.backends import database
from tests.faults.proxy import TcpProxy

pymysql.install_as_MySQLdb()  # the MariaDB driver of the test settings, also on other legs

SERVERS = {
    "postgresql": {"ENGINE": "django.db.backends.postgresql", "NAME": "postgres",
                   "USER": "postgres", "PASSWORD": "", "port": 5432},
    "mysql": {"ENGINE": "django.db.backends.mysql", "NAME": "test", "USER": "root",
              "PASSWORD": "", "port": 3306},
}


def _own_connection_via(proxy: TcpProxy, vendor: str):
    server = {key: value for key, value in SERVERS[vendor].items() if key != "port"}
    alias = f"timeouts-{vendor}"
    connections.settings[alias] = connections.configure_settings(
        {"default": {}, alias: {**server, "HOST": "127.0.0.1", "PORT": str(proxy.port)}})[alias]
    return alias, database.open_own_connection(alias, alias + database.OWN_SUFFIX)


def test_postgresql_connection_gets_tcp_timeouts(monkeypatch):
    monkeypatch.setattr(database, "IO_TIMEOUT", 2)
    proxy = TcpProxy(SERVERS["postgresql"]["port"])
    alias, own = _own_connection_via(proxy, "postgresql")
    try:
        with own.cursor() as cursor:
            cursor.execute("SELECT 1")
        params = own.connection.info.get_parameters()  # what libpq connected with
        assert {key: params.get(key) for key in ("connect_timeout", "tcp_user_timeout",
                                                  "keepalives")} == \
            {"connect_timeout": "2", "tcp_user_timeout": "2000", "keepalives": "1"}
    finally:
        proxy.close()
        own.close()
        connections.settings.pop(alias, None)


def test_a_mariadb_server_that_stops_answering_fails_a_statement_within_the_timeout(
        monkeypatch):
    monkeypatch.setattr(database, "IO_TIMEOUT", 2)
    proxy = TcpProxy(SERVERS["mysql"]["port"])
    alias, own = _own_connection_via(proxy, "mysql")
    try:
        with own.cursor() as cursor:
            cursor.execute("SELECT 1")
        proxy.blackhole()  # the server stops answering: no reply, no reset
        started = time.monotonic()
        with pytest.raises(OperationalError), own.cursor() as cursor:
            cursor.execute("SELECT 1")
        assert time.monotonic() - started < 2 * 2 + 3  # the timeout plus slack, not forever
    finally:
        proxy.close()
        own.close()
        connections.settings.pop(alias, None)
