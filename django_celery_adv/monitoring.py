"""Status of every configured Celery app at once: workers, active tasks, queues.

:func:`inspect_all` asks the workers of each app of ``CELERY_ADV["APPS"]``
(``ping``, ``stats``, ``active``, ``active_queues``) and returns plain
dataclasses that the ``celery_status`` command and the admin pages render.

Guarantees:

* **Concurrent.** Each app is read in its own thread over its own broker
  connection, so the total time is that of the slowest app, not the sum.
* **Fast when healthy.** ``celery inspect`` waits a quiet period of ``timeout``
  after the last reply (celery #5916), so it always costs at least the timeout.
  Here the four commands go out at once and the replies are collected
  together; the reading ends as soon as every worker that answered the
  previous reading has answered all four, plus a short grace for workers not
  seen before (as long again as the known ones took, at least
  :data:`MIN_GRACE`). With no previous reading (first call in a process whose
  cache is empty) it waits the whole timeout to discover the workers.
* **Bounded.** A broker that is down, refuses the connection or stalls gives
  ``reachable=False`` and a readable error, never an exception or a hang: the
  connection has a connect timeout and at most one attempt, and a reading
  still running ``timeout`` + :data:`HARD_GRACE` seconds after the start is
  abandoned and reported as unreachable.
* **Isolated.** Replies are collected on the app's own mailbox (its control
  exchange), so two apps on one broker never list each other's workers
  (see :mod:`django_celery_adv.registry`).
* **No secrets.** Broker URLs pass through :func:`~.masking.mask_url`; error
  texts and task arguments through :func:`~.masking.mask_text` with the
  broker's passwords. Task arguments are read with ``active(safe=True)``,
  i.e. Celery's ``argsrepr`` / ``kwargsrepr``, which a task can set to hide
  what masking cannot recognise.
* **None means unknown.** A field Celery did not report (a worker that answered
  ``ping`` but not ``stats``, a worker known only from the last-seen record)
  is ``None``, never 0 or "down".

Last-seen record: the workers that answered are remembered per alias in
Django's ``default`` cache (falling back to process memory if the cache
fails) for :data:`FORGET_AFTER` seconds. A known worker that does not answer
is listed as ``no reply`` for :data:`OFFLINE_AFTER` seconds after it was last
seen, then ``offline``; when the broker is unreachable, as ``unknown``. With a
cache shared between processes (Redis, Memcached, database), the web server's
processes and the ``celery_status`` command share the record, so the command
is fast too; with ``DummyCache`` every reading is a discovery reading.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from kombu import Consumer, Producer

from . import conf
from .masking import mask_text, mask_url, url_secrets
from .registry import apps

#: Seconds a reading may overrun its timeout before it is abandoned.
HARD_GRACE = 0.75
#: Least time to keep listening for unknown workers once the known ones answered.
MIN_GRACE = 0.02
#: A known worker silent for longer than this is "offline" rather than "no reply".
OFFLINE_AFTER = 60.0
#: A worker silent for longer than this is dropped from the last-seen record.
FORGET_AFTER = 15 * 60.0
#: Task arguments longer than this (after masking) are cut with an ellipsis.
ARGS_LIMIT = 200

CACHE_KEY = "django_celery_adv:monitoring:seen:{alias}"

#: The inspect commands one reading sends, with their arguments.
COMMANDS: dict[str, dict[str, Any]] = {
    "ping": {},
    "stats": {},
    # safe=True: the producer's argsrepr/kwargsrepr strings, never unpickled
    # objects, and a task that hides its arguments that way stays hidden here.
    "active": {"safe": True},
    "active_queues": {},
}


class Status(enum.StrEnum):
    """How a worker stands in one reading."""

    ONLINE = "online"        #: answered this reading
    NO_REPLY = "no reply"    #: seen within OFFLINE_AFTER seconds, silent now
    OFFLINE = "offline"      #: seen within FORGET_AFTER seconds, silent since OFFLINE_AFTER
    UNKNOWN = "unknown"      #: known, but the broker could not be asked


@dataclass
class ActiveTask:
    """A task a worker is executing now."""

    id: str
    name: str
    #: ``argsrepr`` / ``kwargsrepr``, masked and cut to ARGS_LIMIT characters.
    args: str
    kwargs: str
    worker_pid: int | None
    started: datetime | None
    #: Seconds since ``started`` at the time of the reading.
    runtime: float | None


@dataclass
class WorkerStatus:
    """One worker of one app; ``None`` in any field means "not reported"."""

    name: str
    status: Status
    #: The ping reply ("pong") if the worker answered ping.
    ping: str | None = None
    concurrency: int | None = None
    #: Tasks finished since the worker started. Celery's ``stats()["total"]``
    #: counts a task when it starts, so the ones running now are taken off.
    completed: int | None = None
    running: int | None = None
    queues: list[str] | None = None
    active: list[ActiveTask] | None = None
    #: Short pool name: prefork, threads, solo, eventlet, gevent ...
    pool: str | None = None
    #: Seconds since the worker started.
    uptime: float | None = None
    prefetch: int | None = None
    pid: int | None = None
    last_seen: datetime | None = None

    @property
    def online(self) -> bool:
        return self.status == Status.ONLINE


@dataclass
class AppStatus:
    """One app's reading: its broker, whether it answered, and its workers."""

    alias: str
    #: The broker URL with passwords masked.
    broker: str
    reachable: bool
    error: str | None
    workers: list[WorkerStatus] = field(default_factory=list)
    read_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: Seconds the reading took.
    duration: float = 0.0

    @property
    def online(self) -> list[WorkerStatus]:
        return [worker for worker in self.workers if worker.online]

    @property
    def healthy(self) -> bool:
        """Reachable and at least one worker answered (the command's exit 0)."""
        return self.reachable and bool(self.online)

    def worker(self, name: str) -> WorkerStatus | None:
        return next((worker for worker in self.workers if worker.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 strings, statuses as their text."""
        return _jsonable(asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    return value


# -- last-seen record ------------------------------------------------------------

_memory: dict[str, dict[str, float]] = {}
_memory_lock = threading.Lock()


def _cache():
    from django.core.cache import caches

    return caches["default"]


def load_seen(alias: str) -> dict[str, float]:
    """worker name -> when it last answered (epoch seconds), for ``alias``."""
    try:
        record = _cache().get(CACHE_KEY.format(alias=alias))
    except Exception:  # a cache server that is down must not break monitoring
        record = None
    with _memory_lock:
        local = dict(_memory.get(alias, {}))
    if isinstance(record, dict):
        for name, seen in record.items():
            if isinstance(seen, (int, float)) and seen > local.get(name, 0):
                local[name] = float(seen)
    return local


def save_seen(alias: str, record: Mapping[str, float]) -> None:
    now = time.time()
    record = {name: seen for name, seen in record.items() if now - seen <= FORGET_AFTER}
    with _memory_lock:
        _memory[alias] = dict(record)
    # A cache that fails leaves the in-process copy above to serve this process.
    with contextlib.suppress(Exception):
        _cache().set(CACHE_KEY.format(alias=alias), record, timeout=int(FORGET_AFTER))


def forget_workers(aliases: Iterable[str] | None = None) -> None:
    """Drop the last-seen record of ``aliases`` (all configured apps by default)."""
    for alias in list(aliases if aliases is not None else apps):
        with _memory_lock:
            _memory.pop(alias, None)
        with contextlib.suppress(Exception):
            _cache().delete(CACHE_KEY.format(alias=alias))


def expected_workers(record: Mapping[str, float]) -> set[str]:
    """The workers that answered the latest reading (they share its timestamp)."""
    if not record:
        return set()
    latest = max(record.values())
    return {name for name, seen in record.items() if seen == latest}


# -- reading one app ---------------------------------------------------------------

def broker_url(app: Celery) -> str | list[str] | None:
    return app.conf.broker_write_url or app.conf.broker_url


def app_secrets(app: Celery) -> list[str]:
    """Passwords in the app's broker settings: never to be shown, even bare."""
    found = url_secrets(broker_url(app))
    if app.conf.broker_password:
        found.append(str(app.conf.broker_password))
    return found


def collect(app: Celery, expected: set[str], timeout: float,
            commands: Mapping[str, Mapping[str, Any]] = COMMANDS) -> dict[str, dict[str, Any]]:
    """Broadcast ``commands`` at once and gather the replies: command -> node -> reply.

    Ends when every worker in ``expected`` and every worker that answered
    anything has answered every command, plus the grace for unknown workers;
    or when ``timeout`` seconds have passed since the call. Raises the
    broker's errors (the caller turns them into ``reachable=False``).
    """
    started = time.monotonic()
    deadline = started + timeout
    # Our own connection, not the app's pool: it gets a connect timeout, one
    # attempt, and is closed at the end whatever happens. Without the socket
    # timeout (Redis) a broker that accepts and then stalls would keep a reading
    # thread blocked forever after inspect_all() gave up on it.
    socket_timeout = max(timeout, 0.1)
    connection = app.connection_for_write(
        connect_timeout=socket_timeout,
        transport_options={"socket_connect_timeout": socket_timeout,
                           "socket_timeout": socket_timeout,
                           "max_retries": 1, "interval_start": 0, "interval_step": 0})
    replies: dict[str, dict[str, Any]] = {command: {} for command in commands}
    try:
        connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                                     timeout=timeout)
        mailbox = app.control.mailbox(connection)
        channel = connection.default_channel
        tickets: dict[str, str] = {}

        def on_message(body: Any, message: Any) -> None:
            command = tickets.get(message.headers.get("ticket"))
            if command is not None and isinstance(body, dict):
                replies[command].update(body)

        consumer = Consumer(channel, [mailbox.reply_queue], accept=mailbox.accept,
                            no_ack=True, callbacks=[on_message])
        # An explicit producer on our connection: kombu would otherwise take
        # one from the app's pool, whose connection has no timeout.
        producer = Producer(channel, auto_declare=False)
        with consumer:
            for command, arguments in commands.items():
                ticket = str(uuid.uuid4())
                tickets[ticket] = command
                mailbox._publish(command, dict(arguments), reply_ticket=ticket,
                                 channel=channel, timeout=timeout, producer=producer)
            complete_at: float | None = None
            stop_at = deadline
            while True:
                now = time.monotonic()
                answered = set().union(*replies.values())
                wanted = expected | answered
                complete = bool(expected) and all(
                    wanted <= set(by_node) for by_node in replies.values())
                if complete and complete_at is None:
                    complete_at = now
                    stop_at = min(deadline, now + max(MIN_GRACE, now - started))
                elif not complete:  # a newcomer answered part: wait for the rest
                    complete_at, stop_at = None, deadline
                if now >= stop_at:
                    break
                try:
                    connection.drain_events(timeout=stop_at - now)
                except TimeoutError:  # socket.timeout: nothing more within the wait
                    break
        # Only cleanup of a reply queue that expires by itself anyway.
        with contextlib.suppress(Exception):
            channel.after_reply_message_received(mailbox.reply_queue.name)
    finally:
        # Closing waits for the transport's outstanding poll (Redis: a BRPOP of
        # up to a second); the replies are in hand, so let that happen aside.
        threading.Thread(target=_close_quietly, args=(connection,), daemon=True,
                         name="inspect-close").start()
    return replies


def _close_quietly(connection: Any) -> None:
    # A broken connection has nothing left to close cleanly.
    with contextlib.suppress(Exception):
        connection.release()


def _short(text: Any, secrets: Iterable[str]) -> str:
    text = mask_text(text if isinstance(text, str) else repr(text), secrets)
    return text if len(text) <= ARGS_LIMIT else text[:ARGS_LIMIT - 1] + "\u2026"


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _pool_name(pool: Mapping[str, Any]) -> str | None:
    implementation = pool.get("implementation")
    if not isinstance(implementation, str):
        return None
    # "celery.concurrency.prefork:TaskPool" -> "prefork"
    return implementation.partition(":")[0].rpartition(".")[2] or implementation


def _active_task(info: Mapping[str, Any], now: float, secrets: list[str]) -> ActiveTask:
    time_start = info.get("time_start")
    started = runtime = None
    if isinstance(time_start, (int, float)) and time_start > 0:
        started = datetime.fromtimestamp(time_start, UTC)
        runtime = max(0.0, now - time_start)
    return ActiveTask(
        id=str(info.get("id", "")), name=str(info.get("name") or info.get("type") or "?"),
        args=_short(info.get("args", ""), secrets), kwargs=_short(info.get("kwargs", ""), secrets),
        worker_pid=_int(info.get("worker_pid")), started=started, runtime=runtime)


def build_worker(name: str, replies: Mapping[str, Mapping[str, Any]], now: float,
                 secrets: list[str]) -> WorkerStatus:
    """A worker that answered this reading, from whatever it answered."""
    worker = WorkerStatus(name=name, status=Status.ONLINE,
                          last_seen=datetime.fromtimestamp(now, UTC))
    pong = replies["ping"].get(name)
    if isinstance(pong, dict):
        worker.ping = str(pong.get("ok", pong))
    started_tasks: int | None = None
    stats = replies["stats"].get(name)
    if isinstance(stats, dict):
        pool = stats.get("pool") if isinstance(stats.get("pool"), dict) else {}
        worker.concurrency = _int(pool.get("max-concurrency"))
        worker.pool = _pool_name(pool)
        total = stats.get("total")
        if isinstance(total, dict):
            started_tasks = sum(v for v in total.values() if isinstance(v, int))
        worker.uptime = stats.get("uptime") if isinstance(stats.get("uptime"),
                                                          (int, float)) else None
        worker.prefetch = _int(stats.get("prefetch_count"))
        worker.pid = _int(stats.get("pid"))
    active = replies["active"].get(name)
    if isinstance(active, list):
        worker.active = [_active_task(info, now, secrets) for info in active
                         if isinstance(info, dict)]
        worker.running = len(worker.active)
        if started_tasks is not None:
            worker.completed = max(0, started_tasks - worker.running)
    queues = replies["active_queues"].get(name)
    if isinstance(queues, list):
        worker.queues = sorted(str(queue.get("name")) for queue in queues
                               if isinstance(queue, dict) and queue.get("name"))
    return worker


def silent_worker(name: str, seen: float, now: float, reachable: bool) -> WorkerStatus:
    """A worker known from the record that did not answer (or could not be asked)."""
    if not reachable:
        status = Status.UNKNOWN
    elif now - seen <= OFFLINE_AFTER:
        status = Status.NO_REPLY
    else:
        status = Status.OFFLINE
    return WorkerStatus(name=name, status=status, last_seen=datetime.fromtimestamp(seen, UTC))


def read_app(alias: str, timeout: float, record: Mapping[str, float]) -> AppStatus:
    """Read one app; never raises for a broker problem (see the module docstring).

    ``record`` is the app's last-seen record (:func:`load_seen`); it is only
    read here. Workers that answered carry this reading's time in
    ``last_seen``, the same instant for all of them.
    """
    app = apps[alias]
    secrets = app_secrets(app)
    started = time.monotonic()
    status = AppStatus(alias=alias, broker=mask_url(broker_url(app)) or "(Celery default)",
                       reachable=True, error=None)
    try:
        replies = collect(app, expected_workers(record), timeout)
    except Exception as e:  # any broker/client failure is this app's status, not ours
        status.reachable = False
        status.error = mask_text(f"{type(e).__name__}: {e}", secrets)
        replies = None
    now = time.time()
    workers: dict[str, WorkerStatus] = {}
    for name in sorted(set().union(*replies.values())) if replies else ():
        workers[name] = build_worker(name, replies, now, secrets)
    for name, seen in record.items():
        if name not in workers and now - seen <= FORGET_AFTER:
            workers[name] = silent_worker(name, seen, now, status.reachable)
    status.workers = sorted(workers.values(), key=lambda worker: worker.name)
    status.duration = time.monotonic() - started
    return status


def _unreachable(alias: str, error: str, record: Mapping[str, float],
                 duration: float = 0.0) -> AppStatus:
    app = apps[alias]
    now = time.time()
    return AppStatus(
        alias=alias, broker=mask_url(broker_url(app)) or "(Celery default)", reachable=False,
        error=mask_text(error, app_secrets(app)), duration=duration,
        workers=[silent_worker(name, seen, now, False) for name, seen in sorted(record.items())
                 if now - seen <= FORGET_AFTER])


def inspect_all(aliases: Iterable[str] | None = None,
                timeout: float | None = None) -> dict[str, AppStatus]:
    """Read every app in ``aliases`` (default: all configured) concurrently.

    Returns alias -> :class:`AppStatus` in the order asked. ``timeout``
    defaults to ``CELERY_ADV["INSPECT_TIMEOUT"]``. An alias that is not
    configured raises :class:`~.exceptions.ImproperlyConfiguredApp` before
    anything is sent; broker problems never raise. The last-seen record is
    read and written here, in the caller's thread (a database cache then
    uses the caller's connection), one cache read and write per app.
    """
    timeout = float(conf.get("INSPECT_TIMEOUT") if timeout is None else timeout)
    aliases = list(dict.fromkeys(aliases if aliases is not None else apps))
    for alias in aliases:
        apps[alias]  # a configuration error is raised here, in the caller's thread
    records = {alias: load_seen(alias) for alias in aliases}
    results: dict[str, AppStatus] = {}

    def run(alias: str) -> None:
        try:
            results[alias] = read_app(alias, timeout, records[alias])
        except Exception as e:  # a bug or odd settings: still one app's error, not a 500
            results[alias] = _unreachable(alias, f"{type(e).__name__}: {e}", records[alias])

    threads = [threading.Thread(target=run, args=(alias,), daemon=True,
                                name=f"inspect-{alias}") for alias in aliases]
    hard_deadline = time.monotonic() + timeout + HARD_GRACE
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, hard_deadline - time.monotonic()))
    statuses: dict[str, AppStatus] = {}
    for alias in aliases:
        status = results.get(alias)
        if status is None:
            # Still running: a broker that accepted the connection and then
            # stalled. The daemon thread ends on its own socket timeouts.
            status = _unreachable(
                alias, f"no answer from the broker within {timeout + HARD_GRACE:.1f} s",
                records[alias], duration=timeout + HARD_GRACE)
        elif status.reachable:
            record = dict(records[alias])
            record.update({worker.name: worker.last_seen.timestamp()
                           for worker in status.online})
            save_seen(alias, record)
        statuses[alias] = status
    return statuses
