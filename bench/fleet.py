"""A simulated Celery fleet: one process answering the control protocol as N workers.

Why: reading 1,000 or 2,000 workers cannot be tested or measured with real
worker processes on a 2-core machine. This process listens on one app's
pidbox broadcast exchange the way a worker's mailbox does (kombu
:class:`~kombu.pidbox.Mailbox`, the app's ``control_exchange``, the same queue
arguments as Celery's ``Control``) and answers every broadcast as each of its
workers ``<prefix>-<i>@<host>`` would: one reply per worker, ``{hostname:
reply}`` published to the reply exchange and routing key named in the
request, with the request's ``ticket`` header, after a per-worker latency
drawn from a configurable distribution.

What is guaranteed:

* **Real payloads.** Replies are those of one real prefork worker recorded by
  :mod:`bench.fleet_capture` (``bench/fleet_sample.json``: ``ping``,
  ``stats``, ``active``, ``active_queues``, ``registered``, ``scheduled``,
  ``reserved``, ``revoked``, ``conf``, ``report``, ``query_task``, ``hello``,
  and the error a worker sends for a command it does not know), with each
  worker's hostname, pids and running task id substituted, the broker fields
  of ``stats`` taken from this process's connection, ``uptime`` counting from
  the fleet's start and ``clock`` advancing. ``conf(with_defaults=True)``
  answers the recorded ``conf`` (without defaults).
* **Mailbox semantics.** ``destination`` and ``pattern``/``matcher`` select
  workers as kombu's ``Node`` does; a request without ``reply_to`` (a cast
  such as ``shutdown``) is counted and not answered; requests are answered
  whatever their ``expires`` header, as a real worker does.
* **Any kombu transport.** Replies go through a kombu ``Producer``
  (``Producer.batch()``); on Redis, :class:`RedisWriter` stores the same
  messages with one binding lookup per request and one LPUSH per batch, so
  that the simulator costs less CPU than the reader it serves.
* **Honest timing.** Each reply is scheduled at receive time + its latency;
  the process reports how far behind that schedule it published (``lag``), so
  a benchmark can tell a slow reader from a saturated simulator.
* **Optional events.** ``heartbeat=SECONDS`` sends ``worker-online`` once,
  ``worker-heartbeat`` per worker every SECONDS (spread evenly) and
  ``worker-offline`` at the end, on the app's event exchange.

Use it from Python (:class:`Fleet`, a context manager that runs the
simulator in a subprocess, so the reader's GIL is not shared) or from the
shell::

    python -m bench.fleet --broker redis://127.0.0.1:6379/0 --workers 1000 \\
        --latency lognormal:0.003,0.6

``--broker`` may be left out and given as ``FLEET_BROKER_URL`` (so that a
password is not on the command line). SIGTERM or Ctrl-C stops it; it prints
``READY {json}`` once it answers and ``STATS {json}`` when it stops.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import heapq
import json
import math
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = Path(__file__).resolve().parent / "fleet_sample.json"
#: Replies published together (one pipeline on Redis) at most.
BATCH = 500
#: Replies due within this many seconds of the first due one go out in its batch.
COALESCE = 0.0005
#: Pid of simulated worker 0; worker i has pid BASE_PID + 10 * i (pool: the next ones).
BASE_PID = 100_000
#: Default reply latency: a busy but healthy worker, median 3 ms with a long tail
#: (1 reply in 100 over 12 ms). An idle real prefork worker answers each of the
#: reading's commands in about 2 ms round trip here (``round_trip_ms_median`` in
#: bench/fleet_sample.json, measured by bench/fleet_capture.py).
DEFAULT_LATENCY = "lognormal:0.003,0.6"
#: Commands the simulated fleet itself (not a worker) answers when addressed by name.
SELF_COMMANDS = ("ping", "fleet_stats")


# -- latency ---------------------------------------------------------------------------

def parse_latency(spec: str) -> Callable[[random.Random], float]:
    """A sampler (seconds) from ``const:S``, ``uniform:A,B``, ``lognormal:MEDIAN,SIGMA``,
    ``exp:MEAN`` or a bare number (constant)."""
    kind, _, values = spec.partition(":")
    if not values:
        kind, values = "const", kind
    numbers = [float(value) for value in values.split(",")]
    if kind == "const" and len(numbers) == 1:
        return lambda rng: numbers[0]
    if kind == "uniform" and len(numbers) == 2:
        low, high = numbers
        return lambda rng: rng.uniform(low, high)
    if kind == "lognormal" and len(numbers) == 2:
        mu, sigma = math.log(numbers[0]), numbers[1]
        return lambda rng: rng.lognormvariate(mu, sigma)
    if kind == "exp" and len(numbers) == 1:
        return lambda rng: rng.expovariate(1.0 / numbers[0])
    raise ValueError(f"latency {spec!r}: use const:S, uniform:A,B, lognormal:MEDIAN,SIGMA, "
                     "exp:MEAN or a number of seconds")


# -- payloads ----------------------------------------------------------------------------

def load_sample(path: Path = SAMPLE) -> dict[str, Any]:
    return json.loads(path.read_text())


def hostnames(workers: int, prefix: str = "sim", host: str | None = None) -> list[str]:
    host = host or socket.gethostname()
    return [f"{prefix}-{i}@{host}" for i in range(workers)]


def task_id(hostname: str) -> str:
    """The id of the task simulated worker ``hostname`` is running (``active``)."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, hostname))


class Payloads:
    """Each simulated worker's replies, built once from the recorded sample."""

    def __init__(self, sample: Mapping[str, Any], names: Sequence[str],
                 broker_info: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        self.started = time.time()
        self.clock = 0
        self.names = list(names)
        self.task_ids = [task_id(name) for name in names]
        rng = random.Random(seed)
        recorded = sample["replies"]
        text = json.dumps(recorded)
        self._uptime = int(recorded["stats"].get("uptime", 0))
        self.replies: list[dict[str, Any]] = []
        self._encoded: dict[tuple[int, str, bool | None], bytes] = {}
        for i, name in enumerate(self.names):
            replies = json.loads(text.replace(sample["hostname"], name)
                                 .replace(sample["task_id"], self.task_ids[i]))
            pid = BASE_PID + 10 * i
            pool_pids = [pid + 1 + k for k in range(len(sample["pool_pids"]))]
            pid_map = {sample["pid"]: pid, **dict(zip(sample["pool_pids"], pool_pids,
                                                      strict=True))}
            stats = replies["stats"]
            stats["pid"] = pid
            stats["pool"]["processes"] = pool_pids
            if broker_info:
                stats["broker"] = {key: broker_info.get(key, value)
                                   for key, value in stats["broker"].items()}
            # Each worker's task started at its own time before the fleet did.
            started = self.started - rng.uniform(0, 60)
            for task in [*replies["active"], *replies["active:safe"],
                         *(entry[1] for entry in replies["query_task"].values())]:
                task["worker_pid"] = pid_map.get(task.get("worker_pid"), pool_pids[-1])
                task["time_start"] = started
            self.replies.append(replies)

    def reply(self, index: int, method: str, arguments: Mapping[str, Any]) -> Any:
        """What worker ``index`` answers to ``method(**arguments)`` now."""
        self.clock += 1
        replies = self.replies[index]
        if method == "stats":
            stats = dict(replies["stats"])
            stats["uptime"] = self._uptime + int(time.time() - self.started)
            stats["clock"] = str(self.clock)
            return stats
        if method == "active":
            return replies["active:safe" if arguments.get("safe") else "active"]
        if method == "query_task":
            ids = arguments.get("ids") or ()
            ids = [ids] if isinstance(ids, str) else ids
            return {tid: entry for tid, entry in replies["query_task"].items()
                    if tid in ids}
        if method == "hello":
            return {**replies["hello"], "clock": self.clock}
        if method in replies and method not in ("active:safe", "no_such_command"):
            return replies[method]
        return {"error": f"KeyError({method!r})"}

    def encoded(self, index: int, method: str, arguments: Mapping[str, Any]) -> bytes:
        """The JSON body ``{hostname: reply}`` of :meth:`reply`, from a per-worker cache.

        Serializing a ``stats`` reply costs more than publishing it; the
        bodies are encoded once and only ``uptime`` and ``clock`` are spliced
        in per reply, so that the simulator is not what a benchmark measures.
        """
        key = (index, method, bool(arguments.get("safe")) if method == "active" else None)
        if method not in self.replies[index] or method in _UNCACHED:
            return json.dumps({self.names[index]: self.reply(index, method, arguments)}).encode()
        body = self._encoded.get(key)
        if body is None:
            reply = self.reply(index, method, arguments)
            if method == "stats":
                reply = {**reply, "uptime": _UPTIME, "clock": str(_CLOCK)}
            body = self._encoded[key] = json.dumps({self.names[index]: reply}).encode()
        if method == "stats":
            self.clock += 1
            uptime = self._uptime + int(time.time() - self.started)
            body = body.replace(_UPTIME_B, b"%d" % uptime, 1).replace(
                _CLOCK_B, b'"%d"' % self.clock, 1)
        return body


#: Replies that depend on the request's arguments or are not commands.
_UNCACHED = ("query_task", "hello", "active:safe", "no_such_command")
#: Placeholders spliced in :meth:`Payloads.encoded` (values no real reply has).
_UPTIME, _CLOCK = -987654321, -123456789
_UPTIME_B, _CLOCK_B = b"%d" % _UPTIME, b'"%d"' % _CLOCK


# -- the simulator (runs in its own process) ---------------------------------------------

@dataclass
class Request:
    method: str
    arguments: dict[str, Any]
    exchange: str
    routing_key: str
    ticket: str | None
    received: float


@dataclass
class Counters:
    requests: int = 0
    casts: int = 0
    replies: int = 0
    heartbeats: int = 0
    max_lag: float = 0.0
    lag_over_5ms: int = 0
    errors: list[str] = field(default_factory=list)


class FleetServer:
    """N simulated workers on one app's mailbox; :meth:`run` blocks until :meth:`stop`."""

    def __init__(self, broker_url: str, workers: int, *, control_exchange: str = "celery",
                 event_exchange: str = "celeryev", prefix: str = "sim",
                 host: str | None = None, latency: str = DEFAULT_LATENCY,
                 slow: int = 0, slow_latency: float = 5.0, silent: int = 0,
                 heartbeat: float | None = None,
                 transport_options: Mapping[str, Any] | None = None, seed: int = 0,
                 control_queue_ttl: float = 300.0, control_queue_expires: float = 10.0,
                 control_queue_exclusive: bool = True, fast: bool = True) -> None:
        from kombu import Connection

        self.broker_url = broker_url
        self.transport_options = dict(transport_options or {})
        self.names = hostnames(workers, prefix, host)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.node_name = f"{prefix}-fleet-{os.getpid()}@{host or socket.gethostname()}"
        self.control_exchange = control_exchange
        self.event_exchange = event_exchange
        self.sample_latency = parse_latency(latency)
        self.slow, self.slow_latency, self.silent = slow, slow_latency, silent
        self.heartbeat = heartbeat
        self.fast = fast
        self.queue_options = {"queue_ttl": control_queue_ttl,
                              "queue_expires": control_queue_expires,
                              "queue_exclusive": control_queue_exclusive}
        self.rng = random.Random(seed)
        with Connection(broker_url, transport_options=self.transport_options) as probe:
            info = probe.info()
        self.payloads = Payloads(load_sample(), self.names, info, seed)
        self.counters = Counters()
        self._heap: list[tuple[float, int, int, Request]] = []
        self._seq = 0
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self.ready = threading.Event()

    def connection(self):
        from kombu import Connection

        return Connection(self.broker_url, transport_options=self.transport_options,
                          heartbeat=0)

    def mailbox(self, connection):
        from kombu.pidbox import Mailbox

        return Mailbox(self.control_exchange, type="fanout", accept=["json"],
                       serializer="json", reply_queue_ttl=self.queue_options["queue_ttl"],
                       reply_queue_expires=self.queue_options["queue_expires"],
                       **self.queue_options)(connection)

    # -- receiving --------------------------------------------------------------------

    def targets(self, body: Mapping[str, Any]) -> list[int]:
        from kombu.matcher import match

        destination, pattern, matcher = (body.get("destination"), body.get("pattern"),
                                         body.get("matcher"))
        if destination:
            found = [self.index[name] for name in destination if name in self.index]
        elif pattern and matcher:
            found = [i for i, name in enumerate(self.names) if match(name, pattern, matcher)]
        else:
            found = range(len(self.names))
        return [i for i in found if i >= self.silent]

    def on_message(self, body: Any, message: Any) -> None:
        now = time.monotonic()
        if not isinstance(body, dict) or not body.get("method"):
            return
        reply_to = body.get("reply_to")
        method, arguments = body["method"], dict(body.get("arguments") or {})
        if body.get("destination") == [self.node_name]:  # the fleet's own probe
            if reply_to and method in SELF_COMMANDS:
                # fleet_stats is answered after every reply scheduled before it
                # went out: its lag covers the backlog of the last reading.
                reply = {"ok": "pong"} if method == "ping" else \
                    functools.partial(self.stats, bool(arguments.get("reset")))
                with self._cond:  # after every reply already scheduled
                    last = max((item[0] for item in self._heap), default=now)
                self.schedule(Request(method, arguments, reply_to["exchange"],
                                      reply_to["routing_key"], body.get("ticket"), now),
                              [(max(now, last), -1, reply)])
            return
        if not reply_to:
            self.counters.casts += 1
            return
        self.counters.requests += 1
        request = Request(method, arguments, reply_to["exchange"], reply_to["routing_key"],
                          body.get("ticket"), now)
        due = []
        for i in self.targets(body):
            delay = self.slow_latency if i < self.silent + self.slow else \
                self.sample_latency(self.rng)
            due.append((now + delay, i, None))
        self.schedule(request, due)

    def schedule(self, request: Request, due: list[tuple[float, int, Any]]) -> None:
        with self._cond:
            for at, i, reply in due:
                self._seq += 1
                heapq.heappush(self._heap, (at, self._seq, i, (request, reply)))
            self._cond.notify()

    def listen(self) -> None:
        connection = self.connection()
        try:
            mailbox = self.mailbox(connection)
            channel = connection.channel()
            node = mailbox.Node(hostname=self.node_name, channel=channel)
            consumer = node.Consumer(channel, no_ack=True, accept=["json"],
                                     callbacks=[self.on_message])
            with consumer:
                while not self._stopping.is_set():
                    with contextlib.suppress(socket.timeout, TimeoutError):
                        connection.drain_events(timeout=0.25)
        finally:
            with contextlib.suppress(Exception):
                connection.release()

    # -- replying ---------------------------------------------------------------------

    def publish_due(self) -> None:
        connection = self.connection()
        channel = connection.channel()
        fast = self.fast and connection.transport.driver_type == "redis"
        writer = RedisWriter(channel) if fast else KombuWriter(channel)
        try:
            while not self._stopping.is_set():
                with self._cond:
                    while not self._heap and not self._stopping.is_set():
                        self._cond.wait(0.25)
                    if self._stopping.is_set():
                        return
                    wait = self._heap[0][0] - time.monotonic()
                    if wait > 0:
                        self._cond.wait(wait)
                        continue
                    limit = time.monotonic() + COALESCE
                    batch = []
                    while self._heap and self._heap[0][0] <= limit and len(batch) < BATCH:
                        if self._heap[0][2] < 0 and batch:
                            break  # the fleet's own reply goes alone, after these count
                        batch.append(heapq.heappop(self._heap))
                        if batch[-1][2] < 0:
                            break
                messages = []
                for _, _, i, (request, reply) in batch:
                    if i >= 0:
                        body = self.payloads.encoded(i, request.method, request.arguments)
                    else:
                        body = json.dumps({self.node_name: reply() if callable(reply)
                                           else reply}).encode()
                    messages.append((request, body))
                writer.write(messages, self.payloads.clock)
                now = time.monotonic()
                for at, _, i, _ in batch:
                    if i >= 0:
                        self.counters.replies += 1
                        lag = now - at
                        self.counters.max_lag = max(self.counters.max_lag, lag)
                        self.counters.lag_over_5ms += lag > 0.005
        finally:
            with contextlib.suppress(Exception):
                connection.release()

    # -- events -----------------------------------------------------------------------

    def send_events(self) -> None:
        import celery
        from celery.events.event import Event, get_exchange
        from kombu import Producer

        connection = self.connection()
        channel = connection.channel()
        exchange = get_exchange(connection, name=self.event_exchange)
        producer = Producer(channel, exchange=exchange, auto_declare=True)
        software = {"sw_ident": "py-celery", "sw_ver": celery.__version__,
                    "sw_sys": os.uname().sysname}
        utcoffset = -time.timezone // 3600

        def send(kind: str, indices: Sequence[int]) -> None:
            with producer.batch(max_size=BATCH):
                for i in indices:
                    name = self.names[i]
                    self.payloads.clock += 1
                    event = Event(kind, hostname=name, utcoffset=utcoffset,
                                  pid=BASE_PID + 10 * i, clock=self.payloads.clock,
                                  freq=self.heartbeat, active=1, processed=1,
                                  loadavg=[round(v, 2) for v in os.getloadavg()], **software)
                    producer.publish(event, routing_key=kind.replace("-", "."),
                                     serializer="json", headers={"hostname": name},
                                     delivery_mode=1)
            self.counters.heartbeats += len(indices)

        alive = range(self.silent, len(self.names))
        try:
            send("worker-online", alive)
            ticks = max(1, int(self.heartbeat / 0.1))
            slices = [alive[k::ticks] for k in range(ticks)]
            tick = 0
            while not self._stopping.wait(self.heartbeat / ticks):
                send("worker-heartbeat", slices[tick % ticks])
                tick += 1
            send("worker-offline", alive)
        finally:
            with contextlib.suppress(Exception):
                connection.release()

    # -- lifecycle --------------------------------------------------------------------

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """The counters; ``reset`` starts ``max_lag`` and ``lag_over_5ms`` afresh."""
        counters = self.counters
        stats = {"workers": len(self.names), "requests": counters.requests,
                "casts": counters.casts, "replies": counters.replies,
                "heartbeats": counters.heartbeats, "max_lag": round(counters.max_lag, 4),
                "lag_over_5ms": counters.lag_over_5ms, "errors": counters.errors[:5],
                "node": self.node_name}
        if reset:
            counters.max_lag, counters.lag_over_5ms = 0.0, 0
        return stats

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception as e:  # reported in STATS and ends the fleet
                self.counters.errors.append(f"{target.__name__}: {type(e).__name__}: {e}")
                self._stopping.set()
        return run

    def probe(self, timeout: float) -> None:
        """Wait until the mailbox answers a ping addressed to the fleet itself."""
        deadline = time.monotonic() + timeout
        with self.connection() as connection:
            mailbox = self.mailbox(connection)
            while time.monotonic() < deadline and not self._stopping.is_set():
                replies = mailbox._broadcast("ping", destination=[self.node_name], reply=True,
                                             timeout=0.3, limit=1)
                if replies:
                    self.ready.set()
                    return
        raise TimeoutError(f"the fleet's mailbox did not answer within {timeout} s")

    def run(self, on_ready: Callable[[], None] | None = None,
            ready_timeout: float = 30.0) -> dict[str, Any]:
        threads = [threading.Thread(target=self._guard(self.listen), name="fleet-listen"),
                   threading.Thread(target=self._guard(self.publish_due), name="fleet-reply")]
        if self.heartbeat:
            threads.append(threading.Thread(target=self._guard(self.send_events),
                                            name="fleet-events"))
        for thread in threads:
            thread.daemon = True
            thread.start()
        try:
            self.probe(ready_timeout)
            if on_ready:
                on_ready()
            while not self._stopping.wait(0.5):
                pass
        finally:
            self._stopping.set()
            with self._cond:
                self._cond.notify_all()
            for thread in threads:
                thread.join(5)
        return self.stats()

    def stop(self) -> None:
        self._stopping.set()


# -- reply writers --------------------------------------------------------------------------

class KombuWriter:
    """Replies through a kombu ``Producer`` (any transport), batched where kombu can."""

    def __init__(self, channel: Any) -> None:
        from kombu import Producer

        self.channel = channel
        self.producer = Producer(channel, auto_declare=False)
        self.declared: set[str] = set()

    def exchange(self, name: str) -> Any:
        from kombu import Exchange
        from kombu.common import maybe_declare

        exchange = Exchange(name, "direct", durable=False, delivery_mode="transient")
        if name not in self.declared:
            maybe_declare(exchange, self.channel)
            self.declared.add(name)
        return exchange

    def write(self, messages: Sequence[tuple[Request, bytes]], clock: int) -> None:
        with self.producer.batch(max_size=BATCH * 8):
            for request, body in messages:
                self.producer.publish(
                    body, exchange=self.exchange(request.exchange),
                    routing_key=request.routing_key, content_type="application/json",
                    content_encoding="utf-8", delivery_mode=1,
                    headers={"ticket": request.ticket, "clock": clock})


class RedisWriter(KombuWriter):
    """Redis only: the message kombu's Redis transport would store, one LPUSH of
    all the batch's replies to a reply queue, without kombu's per-message work
    (a binding lookup, a serialization and a command per reply).

    The stored message is field for field what ``Producer.publish`` stores for
    a JSON body (base64 body encoding, priority 0, a uuid4 delivery tag; the
    tests compare them). A reply exchange bound to other than exactly one
    queue goes through kombu.
    """

    def __init__(self, channel: Any) -> None:
        super().__init__(channel)
        self.routes: dict[tuple[str, str], str | None] = {}

    def queue(self, exchange: str, routing_key: str) -> str | None:
        key = (exchange, routing_key)
        if key not in self.routes:
            if len(self.routes) > 64:  # reply queues of finished readings
                self.routes.clear()
            self.exchange(exchange)
            queues = list(self.channel._lookup(exchange, routing_key))
            self.routes[key] = queues[0] if len(queues) == 1 else None
        return self.routes[key]

    def write(self, messages: Sequence[tuple[Request, bytes]], clock: int) -> None:
        by_key: dict[str, list[bytes]] = {}
        for request, body in messages:
            queue = self.queue(request.exchange, request.routing_key)
            if queue is None:
                super().write([(request, body)], clock)
                continue
            by_key.setdefault(self.channel._q_for_pri(queue, 0), []).append(b"".join((
                b'{"body": "', base64.b64encode(body),
                b'", "content-encoding": "utf-8", "content-type": "application/json", '
                b'"headers": {"ticket": ', json.dumps(request.ticket).encode(),
                b', "clock": %d}, "properties": {"delivery_mode": 1, "delivery_info": '
                b'{"exchange": ' % clock, json.dumps(request.exchange).encode(),
                b', "routing_key": ', json.dumps(request.routing_key).encode(),
                b'}, "priority": 0, "body_encoding": "base64", "delivery_tag": "',
                str(uuid.uuid4()).encode(), b'"}}')))
        if by_key:
            with self.channel.conn_or_acquire() as client:
                # One LPUSH of many values stores them as that many LPUSHes would.
                for key, values in by_key.items():
                    client.lpush(key, *values)


# -- the handle a test or a benchmark holds -----------------------------------------------

class Fleet:
    """Runs :class:`FleetServer` in a subprocess: ``with Fleet(url, 100) as fleet: ...``.

    ``start()`` returns once the fleet answers on the broker; ``stop()``
    returns its final counters (also in :attr:`result`). The broker URL goes
    to the child in its environment, not on its command line.
    """

    def __init__(self, broker_url: str, workers: int, *, control_exchange: str = "celery",
                 event_exchange: str = "celeryev", prefix: str = "sim",
                 host: str | None = None, latency: str = DEFAULT_LATENCY, slow: int = 0,
                 slow_latency: float = 5.0, silent: int = 0, heartbeat: float | None = None,
                 transport_options: Mapping[str, Any] | None = None, seed: int = 0,
                 log_path: Path | None = None, ready_timeout: float = 30.0,
                 fast: bool = True) -> None:
        self.broker_url = broker_url
        self.workers = workers
        self.control_exchange = control_exchange
        self.transport_options = dict(transport_options or {})
        self.prefix = prefix
        self.host = host or socket.gethostname()
        self.args = ["--workers", str(workers), "--control-exchange", control_exchange,
                     "--event-exchange", event_exchange, "--prefix", prefix,
                     "--host", self.host, "--latency", latency, "--slow", str(slow),
                     "--slow-latency", str(slow_latency), "--silent", str(silent),
                     "--seed", str(seed),
                     "--transport-options", json.dumps(dict(transport_options or {}))]
        if heartbeat:
            self.args += ["--heartbeat", str(heartbeat)]
        if not fast:
            self.args.append("--no-fast")
        self.silent = silent
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}
        self.result: dict[str, Any] | None = None

    @classmethod
    def for_app(cls, app: Any, workers: int, **options: Any) -> Fleet:
        """A fleet on ``app``'s broker, control and event exchanges and transport options."""
        conf = app.conf
        options.setdefault("transport_options", dict(conf.broker_transport_options or {}))
        return cls(conf.broker_write_url or conf.broker_url, workers,
                   control_exchange=conf.control_exchange, event_exchange=conf.event_exchange,
                   **options)

    @property
    def hostnames(self) -> list[str]:
        """Every simulated worker, the silent ones included."""
        return hostnames(self.workers, self.prefix, self.host)

    @property
    def answering(self) -> list[str]:
        return self.hostnames[self.silent:]

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> Fleet:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.fleet", *self.args], cwd=ROOT,
            env={**os.environ, "FLEET_BROKER_URL": self.broker_url,
                 "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                             os.environ.get("PYTHONPATH")]))},
            stdout=subprocess.PIPE, stderr=log, start_new_session=True,
            preexec_fn=_die_with_parent)
        if log is not subprocess.DEVNULL:
            log.close()
        line = self._read_line(self.ready_timeout + 30)
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"fleet did not start: {line!r} {self.result}; "
                               f"see {self.log_path or 'its stderr (log_path=)'}")
        self.info = json.loads(line[6:])
        return self

    def counters(self, reset: bool = False, timeout: float = 5.0) -> dict[str, Any]:
        """The running fleet's counters, asked over the broker (``fleet_stats``).

        The answer waits for every reply due before it, so its ``max_lag``
        includes the backlog of the reading just done; ``reset=True`` starts
        the lag counters afresh (one reading's lag at a time).
        """
        from kombu import Connection, Consumer
        from kombu.pidbox import Mailbox

        answer: dict[str, Any] = {}
        ticket = str(uuid.uuid4())

        def on_reply(body: Any, message: Any) -> None:
            if message.headers.get("ticket") == ticket and isinstance(body, dict):
                answer.update(body)

        deadline = time.monotonic() + timeout
        with Connection(self.broker_url, transport_options=self.transport_options) as conn:
            mailbox = Mailbox(self.control_exchange, type="fanout", accept=["json"],
                              serializer="json")(conn)
            channel = conn.default_channel
            with Consumer(channel, [mailbox.reply_queue], callbacks=[on_reply], no_ack=True,
                          accept=["json"]):
                mailbox._publish("fleet_stats", {"reset": reset},
                                 destination=[self.info["node"]], reply_ticket=ticket,
                                 channel=channel, timeout=timeout)
                # Until our ticket's reply, whatever else the queue holds.
                while not answer and time.monotonic() < deadline:
                    with contextlib.suppress(socket.timeout, TimeoutError):
                        conn.drain_events(timeout=max(0.01, deadline - time.monotonic()))
        if not answer:
            raise TimeoutError(f"the fleet {self.info['node']} did not answer fleet_stats "
                               f"within {timeout} s")
        return next(iter(answer.values()))

    def _read_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        buffer = b""
        stdout = self.process.stdout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(stdout.fileno(), 1)
            if not chunk:
                break
            if chunk == b"\n":
                return buffer.decode()
            buffer += chunk
        return buffer.decode()

    def stop(self, timeout: float = 15.0) -> dict[str, Any] | None:
        if self.process is None or self.result is not None:
            return self.result
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            out, _ = self.process.communicate(timeout=5)
        for line in out.decode(errors="replace").splitlines():
            if line.startswith("STATS "):
                self.result = json.loads(line[6:])
        self.result = self.result or {"exit": self.process.returncode}
        return self.result

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# -- command line ---------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default=os.environ.get("FLEET_BROKER_URL"),
                        help="broker URL (default: $FLEET_BROKER_URL)")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--control-exchange", default="celery",
                        help="the app's control_exchange (default: celery)")
    parser.add_argument("--event-exchange", default="celeryev")
    parser.add_argument("--prefix", default="sim", help="hostnames PREFIX-<i>@HOST")
    parser.add_argument("--host", default=None, help="default: this machine's name")
    parser.add_argument("--latency", default=DEFAULT_LATENCY,
                        help="per-reply latency: const:S, uniform:A,B, lognormal:MEDIAN,SIGMA, "
                             f"exp:MEAN (default {DEFAULT_LATENCY})")
    parser.add_argument("--slow", type=int, default=0,
                        help="this many workers (after the silent ones) answer after "
                             "--slow-latency seconds")
    parser.add_argument("--slow-latency", type=float, default=5.0)
    parser.add_argument("--silent", type=int, default=0,
                        help="the first SILENT workers never answer (known but dead)")
    parser.add_argument("--heartbeat", type=float, default=None,
                        help="send worker events, a heartbeat per worker every SECONDS")
    parser.add_argument("--transport-options", default="{}", help="JSON, as the app's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fast", action="store_true",
                        help="publish every reply through kombu, also on Redis")
    args = parser.parse_args(argv)
    if not args.broker:
        parser.error("--broker or FLEET_BROKER_URL is required")
    server = FleetServer(
        args.broker, args.workers, control_exchange=args.control_exchange,
        event_exchange=args.event_exchange, prefix=args.prefix, host=args.host,
        latency=args.latency, slow=args.slow, slow_latency=args.slow_latency,
        silent=args.silent, heartbeat=args.heartbeat,
        transport_options=json.loads(args.transport_options), seed=args.seed,
        fast=not args.no_fast)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())

    def ready() -> None:
        print("READY " + json.dumps({"node": server.node_name, "workers": args.workers,
                                     "first": server.names[0] if server.names else None}),
              flush=True)

    try:
        stats = server.run(on_ready=ready)
    except TimeoutError as e:
        server.counters.errors.append(str(e))
        stats = server.stats()
    print("STATS " + json.dumps(stats), flush=True)
    return 1 if stats["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
