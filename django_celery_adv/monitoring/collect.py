"""Broadcast inspect commands to one app's workers and read every reply that comes in time.

Guarantees:

* **O(1) per reply.** :class:`Tally` keeps, per worker, how many of the asked
  commands it has answered, and how many workers still owe replies; deciding
  "complete" after a reply is a counter test, never a pass over all replies.
  (The previous collector rebuilt sets over all replies after each one:
  quadratic, ~164 us per reply at 1,000 workers, so from ~1,000 workers the
  deadline came before the replies were read.)
* **Ends early.** The reading ends when every expected worker (those that
  answered the previous reading, from the seen-workers record) and every
  worker that answered anything has answered every command, plus a small
  fixed grace (``MONITORING["NEWCOMER_GRACE"]``) for workers never seen; a
  newcomer answering in the grace is waited for. Otherwise at ``timeout``.
* **Batched on Redis.** kombu's Redis transport delivers a reply per BRPOP
  round trip, each with its own poll cycle and Message object (~150 us per
  reply). Here the reply list of the pidbox reply exchange is drained with
  ``RPOP key 500`` (one round trip per batch, ~15 us per reply; LRANGE +
  LTRIM in a MULTI on Redis < 6.2) and a BRPOP only while it is empty;
  payloads are checked against the app's ``accept_content`` and decoded
  with kombu's ``serialization.loads`` (JSON with the standard library, see
  :func:`decode_payload`). The queue is
  declared and deleted through kombu (same name, binding and format as
  ``Mailbox._collect``), so workers see no difference. Everything that
  arrived before the deadline is read: a last non-blocking drain runs at the
  deadline. On RabbitMQ the broker pushes replies to one consumer as they
  come and kombu's consumer is kept: 2,000 workers read completely in
  0.48 s (0.28 CPU-seconds, mostly py-amqp's frame handling; decoding the
  bodies ourselves as on Redis saved nothing measurable).
* **Bounded.** Own connection with a connect and socket timeout, one attempt;
  broker errors are raised for the caller to turn into ``reachable=False``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from celery import Celery
from kombu import Consumer, Producer
from kombu.serialization import loads, prepare_accept_content

try:
    from redis.exceptions import ResponseError
except ImportError:  # no redis client: no Redis app either
    class ResponseError(Exception):  # type: ignore[no-redef]
        pass

from .. import conf

#: Replies taken from the Redis reply list per round trip.
REDIS_BATCH = 500


class Tally:
    """Replies by command and node, with an O(1) answer to "has everyone answered?"."""

    def __init__(self, commands: Iterable[str], expected: Iterable[str]) -> None:
        self.replies: dict[str, dict[str, Any]] = {command: {} for command in commands}
        self.expected = set(expected)
        self.size = len(self.replies)
        self.answered: dict[str, int] = {}
        #: Workers (expected, or that answered something) still owing a reply.
        self.pending = len(self.expected)

    def add(self, command: str, body: Mapping[str, Any]) -> None:
        by_node = self.replies[command]
        for node, reply in body.items():
            if node in by_node:
                continue  # a duplicate reply counts once
            by_node[node] = reply
            count = self.answered.get(node, 0)
            if count == 0 and node not in self.expected:
                self.pending += 1  # a newcomer now owes the rest
            self.answered[node] = count + 1
            if count + 1 == self.size:
                self.pending -= 1



def connect(app: Celery, timeout: float) -> Any:
    """A connection of our own: connect and socket timeouts, a single attempt.

    Not the app's pool: without the socket timeout (Redis) a broker that
    accepts and then stalls would keep a reading thread blocked forever.
    """
    socket_timeout = max(timeout, 0.1)
    connection = app.connection_for_write(
        connect_timeout=socket_timeout,
        transport_options={"socket_connect_timeout": socket_timeout,
                           "socket_timeout": socket_timeout,
                           "max_retries": 1, "interval_start": 0, "interval_step": 0})
    connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                                 timeout=timeout)
    return connection


def is_redis(channel: Any) -> bool:
    try:
        from kombu.transport.redis import Channel as RedisChannel
    except ImportError:  # redis client not installed: no Redis app either
        return False
    return isinstance(channel, RedisChannel)


def collect(app: Celery, expected: Iterable[str], timeout: float,
            commands: Mapping[str, Mapping[str, Any]],
            grace: float | None = None, destination: list[str] | None = None) -> Tally:
    """Broadcast ``commands`` at once and gather the replies (see the module docstring)."""
    started = time.monotonic()
    deadline = started + timeout
    grace = float(conf.monitoring("NEWCOMER_GRACE") if grace is None else grace)
    tally = Tally(commands, expected)
    connection = connect(app, timeout)
    try:
        mailbox = app.control.mailbox(connection)
        channel = connection.default_channel
        queue = mailbox.reply_queue
        tickets: dict[str, str] = {str(uuid.uuid4()): command for command in commands}
        stop_at = [deadline]

        def on_reply(ticket: Any, body: Any) -> None:
            command = tickets.get(ticket)
            if command is None or not isinstance(body, dict):
                return  # another reading's late reply, or garbage
            was_pending = tally.pending
            tally.add(command, body)
            if tally.pending == 0 and was_pending and tally.expected:
                # Everyone known has answered everything: listen a grace longer.
                # (No expected worker: a discovery reading waits the timeout.)
                stop_at[0] = min(deadline, time.monotonic() + grace)
            elif tally.pending:
                stop_at[0] = deadline  # a newcomer answered part: wait for the rest

        def remaining() -> float:
            return stop_at[0] - time.monotonic()

        producer = Producer(channel, auto_declare=False)
        if is_redis(channel):
            queue(channel).declare()
            publish(mailbox, channel, producer, tickets, commands, timeout, destination)
            drain_redis(channel, queue.name, mailbox.accept, on_reply, remaining)
        else:
            consumer = Consumer(channel, [queue], accept=mailbox.accept, no_ack=True,
                                callbacks=[lambda body, message: on_reply(
                                    message.headers.get("ticket"), body)])
            with consumer:
                publish(mailbox, channel, producer, tickets, commands, timeout, destination)
                while (left := remaining()) > 0:
                    try:
                        connection.drain_events(timeout=left)
                    except TimeoutError:  # socket.timeout: nothing more within the wait
                        break
        # Only cleanup of a reply queue that expires by itself anyway.
        with contextlib.suppress(Exception):
            channel.after_reply_message_received(queue.name)
    finally:
        # Closing may wait for a transport's outstanding poll; the replies are
        # in hand, so let that happen aside.
        threading.Thread(target=_close_quietly, args=(connection,), daemon=True,
                         name="inspect-close").start()
    return tally


def publish(mailbox: Any, channel: Any, producer: Producer, tickets: Mapping[str, str],
            commands: Mapping[str, Mapping[str, Any]], timeout: float,
            destination: list[str] | None = None) -> None:
    for ticket, command in tickets.items():
        mailbox._publish(command, dict(commands[command]), reply_ticket=ticket,
                         channel=channel, timeout=timeout, producer=producer,
                         destination=destination)


def drain_redis(channel: Any, key: str, accept: Any,
                on_reply: Callable[[Any, Any], None], remaining: Callable[[], float]) -> None:
    """Read replies from the Redis list ``key`` in batches until ``remaining()`` <= 0."""
    client = channel.client
    accept = prepare_accept_content(accept)  # ("json",) -> {"application/json"}, as Consumer does
    # BRPOP must return before the socket timeout fires.
    socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout") or 1.0
    block_cap = max(0.01, socket_timeout / 2)

    def handle(raw: bytes) -> None:
        ticket, body = decode_payload(raw, accept)
        on_reply(ticket, body)

    pop = pop_batch
    while True:
        left = remaining()
        try:
            batch = pop(client, key)
        except ResponseError:  # Redis < 6.2: no count argument to RPOP
            pop = pop_batch_old
            batch = pop(client, key)
        if batch:
            for raw in batch:
                handle(raw)
            continue
        if left <= 0:
            return  # the deadline passed and nothing is left in the list
        item = client.brpop([key], timeout=min(left, block_cap))
        if item:
            handle(item[1])


def pop_batch(client: Any, key: str) -> list[bytes] | None:
    """Up to :data:`REDIS_BATCH` of the oldest replies, in one round trip (Redis >= 6.2)."""
    return client.rpop(key, REDIS_BATCH)


def pop_batch_old(client: Any, key: str) -> list[bytes]:
    """The same for older servers: LRANGE + LTRIM of the list's tail in one transaction."""
    with client.pipeline(transaction=True) as pipe:
        pipe.lrange(key, -REDIS_BATCH, -1)
        pipe.ltrim(key, 0, -REDIS_BATCH - 1)
        batch, _ = pipe.execute()
    return batch[::-1]  # oldest first, as RPOP gives them


def decode_payload(raw: bytes | str, accept: Any) -> tuple[Any, Any]:
    """(ticket, body) of one message as kombu's Redis transport stores it; (None, None)
    for anything that is not one (never raises)."""
    try:
        envelope = json.loads(raw)
        headers = envelope.get("headers") or {}
        body = envelope["body"]
        if (envelope.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        content_type = envelope.get("content-type")
        if content_type == "application/json" and content_type in accept:
            # The standard library: kombu's object hook, run on every dict of
            # the body (~50 us per stats reply), only revives kombu's own
            # tagged types (datetime, UUID, Decimal, bytes); no field we read
            # is one of them.
            return headers.get("ticket"), json.loads(body)
        return headers.get("ticket"), loads(body, content_type,
                                            envelope.get("content-encoding", "utf-8"),
                                            accept=accept)
    except Exception:  # a foreign or content-type-refused message is skipped, like kombu does
        return None, None


def _close_quietly(connection: Any) -> None:
    # A broken connection has nothing left to close cleanly.
    with contextlib.suppress(Exception):
        connection.release()
