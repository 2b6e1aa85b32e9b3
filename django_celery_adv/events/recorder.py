"""The event recorder: each app's event stream -> task records, in batches.

One :class:`AppRecorder` per app alias runs two threads:

* the **consumer** reads the app's events with Celery's own
  ``app.events.Receiver`` and folds each task event into an in-memory change
  per task (:func:`.merge.apply_event`); heartbeats and per-worker counts are
  kept aside. It does no I/O besides the broker, so a slow database never
  slows the broker down;
* the **writer** wakes at most once a second, takes what accumulated and
  writes it with :func:`.store.write_batch` (a fixed number of statements per
  batch) and :func:`.store.update_stats`.

Guarantees:

* **Bounded memory.** At most ``MAX_PENDING`` tasks wait for the writer;
  events of further tasks are dropped and counted (``events_dropped``) until
  the writer catches up. The broker is never blocked nor made to buffer.
* **Reconnects.** A lost broker connection is logged (URL masked) and retried
  with a capped backoff; on AMQP the event queue has a fixed name and outlives
  the recorder for ``QUEUE_EXPIRES`` seconds, so events sent while it
  restarts are still delivered (Redis fan-out keeps nothing while nobody
  listens).
* **Events on.** Every ``ENABLE_EVENTS_INTERVAL`` seconds, and as soon as a
  worker it has not seen before sends a heartbeat (workers send those even
  with task events off), it broadcasts ``enable_events`` (as Flower does) and
  logs each worker that had task events off.
* **Clean stop.** :meth:`Recorder.stop` ends the consumers, then the writers
  write what is pending (the last batch is not lost).
* Worker heartbeats mark their workers seen in the fleet record
  (``monitoring.mark_seen_many``, one call per batch), so a busy worker that
  does not answer ``inspect`` but sends heartbeats is not reported dead.

Error handling: a database error keeps the batch in memory (within the
bound) and retries at the next tick; what does not fit is dropped and counted.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from kombu import Queue

from ..masking import mask_text, mask_url, url_secrets
from ..registry import apps
from . import store
from .merge import EVENT_STATES, apply_event

logger = logging.getLogger(__name__)

#: Seconds between two batches at most once a second.
FLUSH_INTERVAL = 1.0
#: Reconnect backoff: first wait and cap, in seconds.
RECONNECT_BACKOFF = (1.0, 30.0)
#: Lag samples (seconds from receipt to commit) kept for the benchmark.
LAG_SAMPLES = 100_000
#: Event queue name prefix (one queue per app per host).
QUEUE_PREFIX = "django_celery_adv.recorder"
_WORKER_COUNT_KEYS = {"task-received": "processed", "task-succeeded": "succeeded",
                      "task-failed": "failed", "task-retried": "retried"}


def _seen_recorders() -> tuple[Callable[..., Any] | None, Callable[..., Any] | None]:
    """The fleet record's ``mark_seen_many`` and ``mark_seen`` (None where absent)."""
    from .. import monitoring

    return getattr(monitoring, "mark_seen_many", None), getattr(monitoring, "mark_seen", None)


class AppRecorder:
    """Records one app's events (see the module docstring)."""

    def __init__(self, alias: str, settings: dict[str, Any], *,
                 enable_events: bool = True) -> None:
        self.alias = alias
        self.settings = settings
        self.app = apps[alias]
        self.max_pending = int(settings["MAX_PENDING"])
        self.enable_interval = float(settings["ENABLE_EVENTS_INTERVAL"] or 0) \
            if enable_events else 0.0
        self.stopping = threading.Event()
        self.consumer_done = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[str, dict[str, Any]] = {}
        self._workers: dict[str, dict[str, int]] = {}
        self._heartbeats: dict[str, dict[str, Any]] = {}
        self._seen = self._dropped = 0
        self._last_event_at: float | None = None
        self._receiver = None
        self._threads: list[threading.Thread] = []
        self._known_workers: set[str] = set()
        self._enable_now = threading.Event()
        self.lag = deque(maxlen=LAG_SAMPLES)
        # Written records whose counters are not saved yet (writer thread only).
        self._unsaved_written = 0
        self._unsaved_counts: dict[str, dict[str, int]] = {}
        self.connected = threading.Event()
        self.broker_error = ""
        self.db_error = ""

    # -- consumer ---------------------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        """Fold one event in (called by the Receiver, or directly by the benchmark)."""
        kind = event.get("type", "")
        received = event.get("local_received") or time.time()
        with self._lock:
            self._seen += 1
            self._last_event_at = event.get("timestamp") or received
            if kind in EVENT_STATES:
                task_id = event.get("uuid")
                if not task_id:
                    return
                change = self._pending.get(task_id)
                if change is None:
                    if len(self._pending) >= self.max_pending:
                        self._dropped += 1
                        return
                    change = self._pending[task_id] = {"_events": 0, "_states": [],
                                                       "_received": received}
                apply_event(change, event)
                change["_events"] += 1
                change["_states"].append(EVENT_STATES[kind])
                counter = _WORKER_COUNT_KEYS.get(kind)
                hostname = event.get("hostname")
                if counter and hostname:
                    counts = self._workers.setdefault(hostname, {})
                    counts[counter] = counts.get(counter, 0) + 1
            elif kind.startswith("worker-") and event.get("hostname"):
                if event["hostname"] not in self._known_workers \
                        and len(self._known_workers) < store.MAX_WORKERS:
                    # A worker new to this recorder may have task events off: ask now.
                    self._known_workers.add(event["hostname"])
                    self._enable_now.set()
                self._heartbeats[event["hostname"]] = {
                    "heartbeat_at": event.get("timestamp") or received,
                    "active": event.get("active"), "loadavg": event.get("loadavg"),
                    "freq": event.get("freq"), "sw_ident": event.get("sw_ident"),
                    "sw_ver": event.get("sw_ver"), "offline": kind == "worker-offline"}

    def _queue(self, receiver) -> Queue:
        expires = float(self.settings["QUEUE_EXPIRES"] or 0) or None
        import socket

        return Queue(f"{QUEUE_PREFIX}.{self.alias}.{socket.gethostname()}",
                     exchange=receiver.exchange, routing_key="#", durable=False,
                     auto_delete=expires is None, expires=expires, message_ttl=expires,
                     max_length=self.max_pending * 10)

    def _error_text(self, error: BaseException) -> str:
        broker = self.app.conf.broker_url
        return mask_text(f"{type(error).__name__}: {error}", url_secrets(broker), limit=300)

    def consume(self) -> None:
        """Consume events until :meth:`stop`, reconnecting after broker errors."""
        backoff = RECONNECT_BACKOFF[0]
        try:
            while not self.stopping.is_set():
                try:
                    with self.app.connection_for_read() as connection:
                        connection.ensure_connection(max_retries=1)
                        receiver = self.app.events.Receiver(
                            connection, handlers={"*": self.on_event},
                            node_id=uuid.uuid4().hex)
                        receiver.queue = self._queue(receiver)
                        receiver.connect_max_retries = 1
                        self._receiver = receiver
                        if self.stopping.is_set():
                            return
                        logger.info("celery_events %s: consuming events from %s", self.alias,
                                    mask_url(self.app.conf.broker_url))
                        self.connected.set()
                        self.broker_error = ""
                        backoff = RECONNECT_BACKOFF[0]
                        for _ in receiver.consume(limit=None, safety_interval=0.5,
                                                  wakeup=False):
                            pass
                except Exception as error:  # any broker/transport error: log, back off, retry
                    self.connected.clear()
                    self.broker_error = self._error_text(error)
                    logger.warning("celery_events %s: broker unavailable (%s); retrying in "
                                   "%.0f s", self.alias, self.broker_error, backoff)
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, RECONNECT_BACKOFF[1])
        finally:
            self.consumer_done.set()

    # -- writer -------------------------------------------------------------------------

    def take(self) -> tuple[dict, dict, dict, int, int, float | None]:
        with self._lock:
            batch = (self._pending, self._workers, self._heartbeats, self._seen,
                     self._dropped, self._last_event_at)
            self._pending, self._workers, self._heartbeats = {}, {}, {}
            self._seen = self._dropped = 0
            self._last_event_at = None
        return batch

    def _put_back(self, pending: dict[str, dict[str, Any]]) -> int:
        """Return an unwritten batch to the buffer; the number of events that did not fit."""
        dropped = 0
        with self._lock:
            for task_id, change in pending.items():
                if task_id in self._pending:
                    newer = self._pending[task_id]
                    for state in change["_states"]:  # keep the older events' counts too
                        newer["_states"].insert(0, state)
                    newer["_events"] += change["_events"]
                    from .merge import RECORD_FIELDS, merge

                    fields = {k: v for k, v in change.items() if k in RECORD_FIELDS}
                    merge(newer, change.get("state"), change.get("state_timestamp") or 0.0,
                          fields)
                elif len(self._pending) < self.max_pending:
                    self._pending[task_id] = change
                else:
                    dropped += change["_events"]
        return dropped

    def flush(self) -> int:
        """Write what accumulated; the number of events written."""
        pending, workers, heartbeats, seen, dropped, last_event_at = self.take()
        if not (pending or workers or heartbeats or seen or dropped or self._unsaved_written):
            return 0
        written = 0
        result = None
        try:
            if pending:
                result = store.write_batch(self.alias, pending)
                written = result.events
                done = time.time()
                self.lag.extend(done - change["_received"] for change in pending.values())
                # Committed: from here on its counts must reach the counters row once.
                self._unsaved_written += written
                store._add_counts(self._unsaved_counts, result.counts)
            store.update_stats(
                self.alias, seen=seen, written=self._unsaved_written, dropped=dropped,
                last_event_at=last_event_at, wrote=bool(pending),
                task_counts=self._unsaved_counts or None, worker_counts=workers,
                heartbeats=heartbeats)
            self._unsaved_written, self._unsaved_counts = 0, {}
            self.db_error = ""
        except Exception as error:  # database down or locked: keep the batch within bounds
            self.db_error = mask_text(f"{type(error).__name__}: {error}", limit=300)
            logger.warning("celery_events %s: cannot write to the database (%s)", self.alias,
                           self.db_error)
            from django.db import close_old_connections

            close_old_connections()
            lost = 0 if result else self._put_back(pending)
            with self._lock:
                self._seen += seen
                self._dropped += dropped + lost
                for hostname, counts in workers.items():
                    mine = self._workers.setdefault(hostname, {})
                    for key, count in counts.items():
                        mine[key] = mine.get(key, 0) + count
                for hostname, beat in heartbeats.items():
                    self._heartbeats.setdefault(hostname, beat)
            return 0
        self._mark_seen(heartbeats)
        return written

    def _mark_seen(self, heartbeats: dict[str, dict[str, Any]]) -> None:
        """Heartbeats count as "seen" in the fleet record: one call per batch."""
        mark_seen_many, mark_seen = _seen_recorders()
        from datetime import UTC, datetime

        seen = {hostname: datetime.fromtimestamp(beat["heartbeat_at"], tz=UTC)
                for hostname, beat in heartbeats.items() if not beat.get("offline")}
        if not seen or (mark_seen_many is None and mark_seen is None):
            return
        try:
            if mark_seen_many is not None:
                mark_seen_many(self.alias, seen)
            else:
                for hostname, when in seen.items():
                    mark_seen(self.alias, hostname, when)
        except Exception as error:  # the fleet record must never stop the recorder
            logger.warning("celery_events %s: marking workers seen failed: %s", self.alias,
                           mask_text(str(error), limit=200))

    def write_loop(self) -> None:
        """Flush at most every :data:`FLUSH_INTERVAL` until the consumer ends, then once more."""
        from django.db import close_old_connections

        try:
            while not self.consumer_done.is_set():
                started = time.monotonic()
                self.flush()
                self.consumer_done.wait(max(0.0, FLUSH_INTERVAL - (time.monotonic() - started)))
            self.flush()
        finally:
            close_old_connections()

    # -- enable_events ---------------------------------------------------------------

    def enable_events(self) -> list[str]:
        """Broadcast ``enable_events``; the workers that had task events off (logged)."""
        turned_on = []
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
            replies = self.app.control.broadcast("enable_events", reply=True, timeout=1.0,
                                                 connection=connection) or []
        for reply in replies:
            for hostname, answer in reply.items():
                if isinstance(answer, dict) and answer.get("ok") == "task events enabled":
                    turned_on.append(hostname)
                    logger.warning("celery_events %s: task events were off on %s; turned "
                                   "them on (enable_events)", self.alias, hostname)
        return turned_on

    def enable_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.enable_events()
            except Exception as error:  # broker down: the consumer reports it
                logger.debug("celery_events %s: enable_events failed: %s", self.alias,
                             self._error_text(error))
            self._enable_now.wait(self.enable_interval)
            self._enable_now.clear()

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> AppRecorder:
        targets = [("consume", self.consume), ("write", self.write_loop)]
        if self.enable_interval > 0:
            targets.append(("enable", self.enable_loop))
        for name, target in targets:
            thread = threading.Thread(target=target, name=f"celery_events-{self.alias}-{name}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._enable_now.set()
        if self._receiver is not None:
            self._receiver.should_stop = True

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


class Recorder:
    """Records several apps at once: one :class:`AppRecorder` each, and periodic prunes."""

    def __init__(self, aliases: Iterable[str], settings_for: Callable[[str], dict[str, Any]],
                 *, enable_events: bool = True) -> None:
        self.settings_for = settings_for
        self.recorders = [AppRecorder(alias, settings_for(alias), enable_events=enable_events)
                          for alias in aliases]
        self.stopping = threading.Event()

    def start(self) -> Recorder:
        for recorder in self.recorders:
            recorder.start()
        return self

    def prune_once(self) -> None:
        for recorder in self.recorders:
            try:
                result = store.prune(recorder.alias, days=recorder.settings["RETENTION_DAYS"],
                                     keep=recorder.settings["RETENTION_COUNT"])
                if result.by_age or result.by_count:
                    logger.info("celery_events %s: pruned %d record(s) by age, %d by count",
                                recorder.alias, result.by_age, result.by_count)
            except Exception as error:
                logger.warning("celery_events %s: prune failed: %s", recorder.alias,
                               mask_text(str(error), limit=200))

    def run_until(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set, pruning every ``PRUNE_INTERVAL``; then stop and flush."""
        self.start()
        intervals = [float(r.settings["PRUNE_INTERVAL"] or 0) for r in self.recorders]
        interval = min((i for i in intervals if i > 0), default=0.0)
        next_prune = time.monotonic() if interval else float("inf")
        while not stop.is_set():
            if time.monotonic() >= next_prune:
                self.prune_once()
                next_prune = time.monotonic() + interval
            stop.wait(min(1.0, max(0.0, next_prune - time.monotonic())))
        self.stop()

    def stop(self, timeout: float = 30.0) -> None:
        for recorder in self.recorders:
            recorder.stop()
        for recorder in self.recorders:
            recorder.join(timeout)
