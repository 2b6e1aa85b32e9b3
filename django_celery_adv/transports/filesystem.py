"""kombu's ``filesystem`` transport, with messages and bindings never seen half-written.

Why it exists: kombu's stock transport (``kombu.transport.filesystem``, see
kombu issue #1551) creates each message file under its final name and then
writes into it. A consumer polling the folder can claim the file in between
and read zero or part of its bytes; the ``JSONDecodeError`` that follows is an
"Unrecoverable error" for a Celery worker, which exits. Its exchange tables
(the bindings that fanout ``inspect`` broadcasts and their replies are routed
by) are created with a truncating ``open("wb")`` before the lock is taken, so a
reader can see them empty or torn as well. The demo runs on this transport.

Guarantees, for processes that all use this transport on the same folders of
one local filesystem:

* A consumer sees a message only once it is complete: the producer writes it
  under a temporary name the consumers' pattern does not match
  (``<name>.<queue>.msg.tmp``) and renames it into place (``os.replace`` is
  atomic within one filesystem).
* Each message is claimed by one consumer: an atomic rename into the processed
  folder (``store_processed``) or into ``<data_folder_in>/.claimed``, both on
  the same filesystem, never a copy.
* An exchange table is read whole: its read-modify-write runs under an
  exclusive ``flock`` of a companion ``.lock`` file and the new table replaces
  the old one by rename; readers need no lock.
* A message file that cannot be decoded all the same (written by another
  producer) is renamed ``*.bad``, logged and skipped: the consumer lives on.
* A worker asked to stop leaves its wait for messages within 0.25 s. Celery's
  blocking loop (used for this transport) waits 2 s per turn and one turn more
  after the request, which made a warm shutdown take 4 s before it began.

Not guaranteed: durability across a power cut (no ``fsync``), network
filesystems (rename and flock semantics vary), several machines, priorities,
TTLs. Mixing with the stock transport on the same folders brings its race back.

Use it with the stock URL and options and this class as the transport::

    "broker_url": "filesystem://",
    "broker_transport": "django_celery_adv.transports.filesystem:Transport",
"""

from __future__ import annotations

import fcntl
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem, virtual
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads
from kombu.utils.objects import cached_property

logger = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
#: How long one wait for messages lasts before the worker's shutdown is checked.
DRAIN_SLICE = 0.25
BAD_SUFFIX = ".bad"


def write_atomically(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees nothing or all of it."""
    temp = f"{path}{TEMP_SUFFIX}"  # unique: every final name here is unique or locked
    with open(temp, "wb") as f:
        f.write(data)
    os.replace(temp, path)


class Channel(filesystem.Channel):
    """The stock channel with atomic message files and exchange tables."""

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        path = os.path.join(self.data_folder_out, name)
        try:
            write_atomically(path, str_to_bytes(dumps(payload)))
        except OSError as exc:
            raise ChannelError(f"Cannot add file {path!r} to directory") from exc

    def _get(self, queue: str) -> Any:
        wanted = f"{queue}.msg"
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != wanted:
                continue
            claimed = os.path.join(self.claim_folder, name)
            try:
                os.rename(os.path.join(self.data_folder_in, name), claimed)
            except FileNotFoundError:
                continue  # another consumer claimed it first
            try:
                with open(claimed, "rb") as f:
                    payload = f.read()
                message = loads(bytes_to_str(payload))
            except OSError as exc:
                raise ChannelError(f"Cannot read file {claimed!r} from queue.") from exc
            except ValueError:
                os.replace(claimed, claimed + BAD_SUFFIX)
                logger.error("Set aside undecodable message file %s%s (%d bytes)",
                             claimed, BAD_SUFFIX, len(payload))
                continue
            if not self.store_processed:
                os.remove(claimed)
            return message
        raise Empty()

    @cached_property
    def claim_folder(self) -> str:
        if self.store_processed:
            return self.processed_folder
        folder = os.path.join(self.data_folder_in, ".claimed")
        os.makedirs(folder, exist_ok=True)
        return folder

    def get_table(self, exchange: str) -> list:
        return self._read_table(self._exchange_file(exchange))

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        with self._table_update(exchange) as (path, table):
            if binding not in table:
                write_atomically(path, str_to_bytes(dumps([binding, *table])))

    def _delete(self, queue: str, exchange: str, routing_key: str, pattern: str,
                *args: Any, **kwargs: Any) -> None:
        # The stock channel's own _delete rewrites the table in place: skip it.
        virtual.Channel._delete(self, queue, exchange, routing_key, pattern, *args, **kwargs)
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        with self._table_update(exchange) as (path, table):
            if binding in table:
                table.remove(binding)
                write_atomically(path, str_to_bytes(dumps(table)))

    @contextmanager
    def _table_update(self, exchange: str) -> Iterator[tuple[Path, list]]:
        """The table of ``exchange``, held under an exclusive lock for a rewrite."""
        path = self._exchange_file(exchange)
        self.control_folder.mkdir(parents=True, exist_ok=True)
        try:
            with open(f"{path}.lock", "a") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released by close()
                yield path, self._read_table(path)
        except OSError as exc:
            raise ChannelError(f"Cannot update {path}") from exc

    @staticmethod
    def _read_table(path: Path) -> list:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ChannelError(f"Cannot open {path}") from exc
        return [filesystem.exchange_queue_t(*row) for row in loads(bytes_to_str(data))]


def _worker_stopping() -> bool:
    from celery.worker import state  # set by the worker's SIGTERM/SIGINT/SIGQUIT handlers

    return state.should_stop is not None or state.should_terminate is not None


class Transport(filesystem.Transport):
    """``filesystem://`` with :class:`Channel`: give its class path as ``broker_transport``."""

    Channel = Channel
    global_state = virtual.BrokerState()

    def drain_events(self, connection: Any, timeout: float | None = None) -> Any:
        if timeout is None:
            return super().drain_events(connection)
        deadline = monotonic() + timeout
        while True:  # in slices, so that a stopping worker is seen within one
            slice_ = max(0.0, min(deadline - monotonic(), DRAIN_SLICE))
            try:
                return super().drain_events(connection, timeout=slice_)
            except TimeoutError:  # socket.timeout: this slice ran out
                if monotonic() >= deadline or _worker_stopping():
                    raise
