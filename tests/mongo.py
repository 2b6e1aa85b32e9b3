"""A MongoDB broker for the tests: a real mongod if ``MONGODB_URL`` is set, else mongomock.

Why this exists: no mongod can be installed on the development and CI machines
(see ``/work/shared/SERVICES.md``), yet an app of the registry may use
``mongodb://`` as its broker. Without ``MONGODB_URL`` this module runs kombu's
own MongoDB transport (``kombu.transport.mongodb``) on an in-memory mongomock
server by patching two things, for the duration of :func:`mongo_broker` only:

1. ``kombu.transport.mongodb.MongoClient`` (kombu imports the name into its own
   module, so patching ``pymongo.MongoClient`` would do nothing) becomes a
   ``mongomock.MongoClient`` factory whose clients all share one in-memory
   server, so the producer, the worker's consumer and the control replies see
   the same collections. That server lives as long as the process, like a real
   mongod would: kombu keeps producer connections in a process-wide pool keyed
   by broker URL (``kombu.pools``), so a connection opened under an earlier
   :func:`mongo_broker` block is reused by later ones and must still reach the
   same data. Tests sharing it are kept apart by their aliases' queue and
   exchange names.
2. ``kombu.transport.mongodb.Transport.Channel`` becomes :class:`PollingChannel`.
   kombu broadcasts (fanout: ``inspect``/``control``) through a *capped*
   collection read by a *tailable* cursor; mongomock refuses capped collections
   and its cursors never see documents inserted after they were exhausted.
   :class:`PollingChannel` creates a plain collection and reads it with
   :class:`PollingBroadcastCursor`, which re-queries from the last offset on
   every poll, with kombu's own offset arithmetic. Everything else (queues,
   routing table, ``find_one_and_delete`` consumption, URL parsing) is kombu's
   code unchanged.

A kombu 5.7 quirk this keeps (and the tests work with, not around): a new
broadcast cursor starts at the count of the *whole* broadcast collection but
skips that many documents of *its own* exchange. So when the collection holds
broadcasts of other control exchanges (two aliases on one MongoDB database:
``celery.a`` and ``celery.b``), a worker started afterwards ignores as many of
its own alias's first ``inspect``/``control`` broadcasts. The tests therefore
keep the alias's names stable from run to run instead of inventing new ones.

What it does not prove: anything about a real server. mongomock's memory lives
in this process, so only an in-process worker (``celery.contrib.testing.worker``)
can use it, not a worker subprocess; its ``find_one_and_delete`` is not atomic,
so competing consumers are not exercised; capped-collection limits
(``capped_queue_size``), tailable-cursor invalidation, TTL indexes, auth/TLS and
the server's wire behaviour are not exercised. Set ``MONGODB_URL`` to run the
same tests, unpatched, against a real mongod.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from unittest import mock

import pytest
from kombu.transport import mongodb as kombu_mongodb
from kombu.utils.url import maybe_sanitize_url

#: Real server to use instead of mongomock, e.g. ``mongodb://127.0.0.1:27017/celery_adv_test``.
MONGODB_URL = os.environ.get("MONGODB_URL", "")
#: ``"mongod"`` with ``MONGODB_URL`` set, else ``"mongomock"``; used as the test id.
MODE = "mongod" if MONGODB_URL else "mongomock"
#: Broker URL in mongomock mode. Nothing listens there: if the patch were not
#: applied, pymongo would fail to connect instead of silently passing.
MONGOMOCK_URL = "mongodb://127.0.0.1:27017/celery_adv_test"


def describe_mode() -> str:
    if MODE == "mongod":
        return f"MongoDB broker: mongod at {maybe_sanitize_url(MONGODB_URL)}"
    return "MongoDB broker: mongomock (set MONGODB_URL to use a real mongod)"


class PollingBroadcastCursor:
    """kombu's ``BroadcastCursor`` with a query per poll in place of a tailable cursor.

    Same interface (``get_size``, ``purge``, ``close``, iteration) and the same
    offset arithmetic as kombu 5.7, quirk included: the offset starts at the
    count of the *whole* broadcast collection, and is then used as a skip over
    the documents of *this* exchange. Only the tailing is replaced, so these
    tests pass or fail as kombu itself would.
    """

    def __init__(self, collection, exchange: str) -> None:
        self._collection = collection
        self._filter = {"queue": exchange}
        self._offset = 0
        self.purge(rewind=False)

    def get_size(self) -> int:
        return self._collection.count_documents({}) - self._offset

    def close(self) -> None:
        pass

    def purge(self, rewind: bool = True) -> None:
        self._offset = self._collection.count_documents({})

    def __iter__(self) -> PollingBroadcastCursor:
        return self

    def __next__(self) -> dict:
        # A fresh query each time: mongomock's cursors never see later inserts.
        for doc in self._collection.find(self._filter, skip=self._offset, limit=1):
            self._offset += 1
            return doc
        raise StopIteration

    next = __next__


class PollingChannel(kombu_mongodb.Channel):
    """kombu's MongoDB channel with a plain, polled broadcast collection."""

    def _create_broadcast(self, database):
        # No capped collection: kombu's _ensure_indexes creates a plain one.
        pass

    def _create_broadcast_cursor(self, exchange, routing_key, pattern, queue):
        cursor = PollingBroadcastCursor(self.broadcast, exchange)
        self._broadcast_cursors[queue] = cursor
        return cursor


@functools.cache
def _mongomock_server():
    """The one in-memory mongomock server of this process (see the module docstring)."""
    from mongomock.store import ServerStore

    return ServerStore()


@contextmanager
def mongo_broker() -> Iterator[str]:
    """Yield the broker URL to use; patch kombu onto mongomock unless ``MONGODB_URL`` is set."""
    if MODE == "mongod":
        yield MONGODB_URL
        return

    import mongomock

    client_factory = functools.partial(mongomock.MongoClient, _store=_mongomock_server())
    with (
        mock.patch("kombu.transport.mongodb.MongoClient", client_factory),
        mock.patch.object(kombu_mongodb.Transport, "Channel", PollingChannel),
    ):
        yield MONGOMOCK_URL


@pytest.fixture(scope="module", params=[MODE], ids=[MODE])
def mongo_broker_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The broker URL (see :func:`mongo_broker`), for the tests of one module.

    The test id ends in ``[mongomock]`` or ``[mongod]``, and a line naming the
    mode is written to the terminal past output capture, so even ``pytest -q``
    shows which server the tests ran on.
    """
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        with capture.global_and_fixture_disabled() if capture else nullcontext():
            terminal.ensure_newline()
            terminal.write_line(describe_mode())
    with mongo_broker() as url:
        yield url
