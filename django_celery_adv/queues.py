"""Messages waiting in each queue of every configured Celery app, and purging one.

:func:`read_queues` lists, per app, the queues its settings declare
(``task_queues``, else ``task_default_queue``) plus the queues its workers
consume according to a monitoring reading, each with the number of messages
ready, read from the broker itself:

* **RabbitMQ** (kombu's ``amqp`` transports): a passive ``queue.declare``
  per queue, whose answer carries the ready count and the number of
  consumers. No management plugin is needed. AMQP does not report
  unacknowledged messages there, so ``unacked`` stays ``None`` (unknown).
* **Redis**: kombu keeps one list per priority step (the queue's own name for
  step 0, ``<queue><sep><step>`` for the others, ``sep`` and
  ``priority_steps`` from the app's ``broker_transport_options``, keys under
  its ``global_keyprefix``), so ``ready`` is the sum of ``LLEN`` over those
  lists, read in one pipeline. Messages delivered but not acknowledged live
  in kombu's ``unacked`` hash, shared by every queue (and every app) of that
  Redis database: reported once per app as :attr:`AppQueues.unacked`.
* **Other transports** (filesystem, memory, SQS ...): ``supported=False`` and
  every count ``None``; no number is better than a wrong one.

Guarantees:

* **No broadcast.** Nothing here sends an ``inspect`` command: which queues
  workers consume comes from the ``statuses`` the caller passes (a reading of
  :func:`django_celery_adv.monitoring.inspect_all`, possibly a stored one). A
  scrape (``/metrics``) can call :func:`read_queues` without ``statuses``.
* **Bounded and isolated.** Each app is read in its own thread over its own
  short-lived connection (:mod:`.brokers`), with ``INSPECT_TIMEOUT`` as the
  connect and socket timeout; a broker that is down gives ``error`` (masked,
  readable) for that app only, never an exception.
* **None means unknown**, never 0.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from django.utils.translation import gettext as _
from kombu import Connection

from . import conf
from .brokers import AMQP, REDIS, bounded_connection, driver_type, masked_error
from .exceptions import BrokerError
from .masking import mask_url
from .monitoring import AppStatus, broker_url
from .registry import apps

#: Transports whose message counts are read (kombu ``driver_type``).
SUPPORTED = (AMQP, REDIS)
#: Seconds past twice the timeout after which an app's read is given up.
HARD_GRACE = 1.0


@dataclass
class QueueDepth:
    """One queue of one app; ``None`` in a count means "not known"."""

    name: str
    #: Messages waiting to be delivered (Redis: summed over the priority lists).
    ready: int | None = None
    #: RabbitMQ: not reported over AMQP, always ``None``.
    unacked: int | None = None
    #: Consumers the broker counts (RabbitMQ only).
    consumers: int | None = None
    #: Workers consuming the queue according to the reading passed in.
    workers: list[str] = field(default_factory=list)
    #: Declared in the app's settings (``task_queues`` / ``task_default_queue``).
    configured: bool = False
    #: ``False`` when RabbitMQ has no such queue (nothing was ever declared).
    exists: bool | None = None


@dataclass
class AppQueues:
    """The queues of one app as read from its broker."""

    alias: str
    #: The broker URL with passwords masked.
    broker: str
    #: kombu's ``driver_type``: ``amqp``, ``redis``, ``filesystem`` ...
    transport: str
    #: Whether counts can be read on this transport at all.
    supported: bool
    #: The broker's error (masked); ``None`` when the counts were read.
    error: str | None = None
    queues: list[QueueDepth] = field(default_factory=list)
    #: Redis: kombu's ``unacked`` hash size, for the whole Redis database.
    unacked: int | None = None
    read_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    duration: float = 0.0

    @property
    def readable(self) -> bool:
        """Counts were read (supported transport and no error)."""
        return self.supported and self.error is None

    def queue(self, name: str) -> QueueDepth | None:
        return next((queue for queue in self.queues if queue.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the read time as an ISO 8601 string."""
        data = asdict(self)
        data["read_at"] = self.read_at.isoformat()
        return data


def configured_queues(app: Celery) -> list[str]:
    """The queue names the app's settings declare (no I/O)."""
    return list(app.amqp.queues.keys()) or [app.conf.task_default_queue]


def consumed_queues(status: AppStatus | None) -> dict[str, list[str]]:
    """queue name -> names of the workers that consume it, from one reading."""
    consumers: dict[str, list[str]] = {}
    for worker in status.workers if status is not None else ():
        for queue in worker.queues or ():
            consumers.setdefault(queue, []).append(worker.name)
    return consumers


def _redis_keys(channel: Any, queue: str) -> list[str]:
    # kombu's Channel._q_for_pri for each step: step 0 is the bare name.
    return [f"{queue}{channel.sep}{step}" if step else queue
            for step in channel.priority_steps]


def _read_redis(connection: Connection, reading: AppQueues) -> None:
    channel = connection.default_channel
    # The channel's client carries the app's global_keyprefix and timeouts.
    with channel.client.pipeline(transaction=False) as pipe:
        for queue in reading.queues:
            for key in _redis_keys(channel, queue.name):
                pipe.llen(key)
        pipe.hlen(channel.unacked_key)
        sizes = pipe.execute()
    steps = len(channel.priority_steps)
    for index, queue in enumerate(reading.queues):
        queue.ready = sum(int(size) for size in sizes[index * steps:(index + 1) * steps])
    reading.unacked = int(sizes[-1])


def _check_redis_lists(channel: Any, queue: str) -> None:
    """Refuse a name whose keys are not lists: kombu's purge would delete them."""
    with channel.client.pipeline(transaction=False) as pipe:
        for key in _redis_keys(channel, queue):
            pipe.type(channel.global_keyprefix + key)  # TYPE is not among kombu's prefixed
        kinds = {kind.decode() if isinstance(kind, bytes) else str(kind)
                 for kind in pipe.execute()}
    if kinds - {"list", "none"}:
        raise BrokerError(_("%(queue)r is not a queue on this Redis database")
                          % {"queue": queue})


def _read_amqp(connection: Connection, reading: AppQueues) -> None:
    for queue in reading.queues:
        # A passive declare of a missing queue closes the channel (404), so
        # one channel per queue.
        channel = connection.channel()
        try:
            _, queue.ready, queue.consumers = channel.queue_declare(queue=queue.name,
                                                                    passive=True)
            queue.exists = True
        except connection.channel_errors:
            queue.exists = False
        finally:
            with contextlib.suppress(Exception):
                channel.close()


def known_queues(alias: str, status: AppStatus | None = None) -> list[str]:
    """The queues of the app's settings plus those its workers consume in ``status``."""
    return list(dict.fromkeys([*configured_queues(apps[alias]),
                               *sorted(consumed_queues(status))]))


def read_app(alias: str, status: AppStatus | None = None, timeout: float | None = None,
             extra: Iterable[str] = ()) -> AppQueues:
    """The queues of one app with their counts; broker problems go to ``error``.

    ``extra`` names queues to read besides the configured and consumed ones.
    """
    started = time.monotonic()
    app = apps[alias]
    timeout = float(conf.get("INSPECT_TIMEOUT") if timeout is None else timeout)
    consumers = consumed_queues(status)
    configured = configured_queues(app)
    names = list(dict.fromkeys([*configured, *sorted(consumers), *extra]))
    transport = driver_type(app)
    reading = AppQueues(
        alias=alias, broker=mask_url(broker_url(app)) or "(Celery default)",
        transport=transport, supported=transport in SUPPORTED,
        queues=[QueueDepth(name=name, workers=sorted(consumers.get(name, [])),
                           configured=name in configured) for name in names])
    if reading.supported:
        try:
            with bounded_connection(app, timeout) as connection:
                (_read_redis if transport == REDIS else _read_amqp)(connection, reading)
        except BrokerError as e:
            reading.error = str(e)
        except Exception as e:  # a broker failing mid-way: this app's error, not ours
            reading.error = masked_error(app, e)
        if reading.error is not None:
            for queue in reading.queues:
                queue.ready = queue.consumers = queue.exists = None
            reading.unacked = None
    reading.duration = time.monotonic() - started
    return reading


def read_queues(aliases: Iterable[str] | None = None,
                statuses: Mapping[str, AppStatus] | None = None,
                timeout: float | None = None) -> dict[str, AppQueues]:
    """Message counts of every queue of every app in ``aliases`` (default: all).

    ``statuses`` (alias -> :class:`~.monitoring.AppStatus`, e.g. the result
    of :func:`~.monitoring.inspect_all` or a stored reading) adds the queues
    the workers consume and who consumes them; without it only the queues
    the settings declare are read, and **no inspect broadcast is ever sent**
    either way. Returns alias -> :class:`AppQueues` in the order asked, each
    read concurrently over its own connection; ``timeout`` (default
    ``INSPECT_TIMEOUT``) bounds each broker's connect and socket waits. An
    unknown alias raises :class:`~.exceptions.ImproperlyConfiguredApp`; a
    broker that fails never raises (see :attr:`AppQueues.error`).
    """
    aliases = list(dict.fromkeys(aliases if aliases is not None else apps))
    for alias in aliases:
        apps[alias]  # a configuration error is raised here, in the caller's thread
    statuses = statuses or {}
    seconds = float(conf.get("INSPECT_TIMEOUT") if timeout is None else timeout)
    results: dict[str, AppQueues] = {}

    def run(alias: str) -> None:
        try:
            results[alias] = read_app(alias, statuses.get(alias), seconds)
        except Exception as e:  # odd settings: still one app's error, not a 500
            app = apps[alias]
            results[alias] = AppQueues(alias=alias, broker=mask_url(broker_url(app)),
                                       transport="?", supported=False,
                                       error=masked_error(app, e))

    threads = [threading.Thread(target=run, args=(alias,), daemon=True,
                                name=f"queues-{alias}") for alias in aliases]
    # Socket timeouts bound each read; the deadline guards against what they miss
    # (a resolver that hangs): such an app is reported, its thread left to end.
    hard_deadline = time.monotonic() + 2 * seconds + HARD_GRACE
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, hard_deadline - time.monotonic()))
    for alias in aliases:
        if alias not in results:
            app = apps[alias]
            results[alias] = AppQueues(
                alias=alias, broker=mask_url(broker_url(app)), transport=driver_type(app),
                supported=driver_type(app) in SUPPORTED,
                queues=[QueueDepth(name=name, configured=name in configured_queues(app))
                        for name in known_queues(alias, statuses.get(alias))],
                error=_("no answer from the broker within %(seconds).1f s")
                % {"seconds": 2 * seconds + HARD_GRACE})
    return {alias: results[alias] for alias in aliases}


def purge_queue(alias: str, queue: str, timeout: float | None = None) -> int:
    """Delete every ready message of ``queue`` on ``alias``'s broker; returns how many.

    On Redis all of kombu's priority lists of the queue are emptied. Raises
    :class:`~.exceptions.BrokerError` (masked, readable) when the broker
    fails, the queue does not exist (RabbitMQ) or the transport is not one
    whose counts we read (the confirmation could not have named a count).
    """
    app = apps[alias]
    transport = driver_type(app)
    if transport not in SUPPORTED:
        raise BrokerError(_("purging is not supported on the %(transport)s transport")
                          % {"transport": transport})
    timeout = float(conf.get("INSPECT_TIMEOUT") if timeout is None else timeout)
    with bounded_connection(app, timeout) as connection:
        channel = connection.channel()
        try:
            if transport == REDIS:
                _check_redis_lists(channel, queue)
            return int(channel.queue_purge(queue=queue) or 0)
        except BrokerError:
            raise
        except connection.channel_errors as e:
            raise BrokerError(_("no queue %(queue)r on the broker (%(error)s)")
                              % {"queue": queue, "error": masked_error(app, e)}) from e
        except Exception as e:
            raise BrokerError(masked_error(app, e)) from e
        finally:
            with contextlib.suppress(Exception):
                channel.close()
