"""Lock backend on ZooKeeper, built from kazoo's own recipes.

A lock of capacity 1 is a kazoo :class:`~kazoo.recipe.lock.Lock`; a larger
capacity is a kazoo :class:`~kazoo.recipe.lock.Semaphore`. Each lease is an
ephemeral node whose data is the holder as JSON (``task_id``, ``hostname``,
``pid``, plus ``slot`` and ``ttl``), so any kazoo client can list the holders
with ``Semaphore.lease_holders()`` or ``Lock.contenders()``. The fencing token
is the lease node's ``czxid``.

Layout under ``<root>/<quoted name>/``::

    semaphore               kazoo Semaphore (data: max_leases), its lease nodes
                            (named ``<uuid>-slot<n>``, the slot also in the data)
    semaphore-__lock__/     the Semaphore's own internal lock
    lock/                   kazoo Lock used when the capacity is 1

A grant takes its node through the recipe and then checks, with reads sent
after the create, what the recipe itself cannot see; if the check fails it
deletes its node again and tries anew (for up to ``guard_timeout``):

* a Lock grant: the Semaphore has no lease, and none was created or deleted
  since our node (the Semaphore's ``pzxid`` is not above our ``czxid``);
* a Semaphore grant: its leases, plus one if the Lock has any node (holder or
  contender), are within the capacity; no lease younger than ours exists or
  existed (``pzxid``); no other lease has our slot, nor the Lock slot 0.

Why this is safe: a client's read after its own write sees every write with a
lower zxid (servers apply writes in zxid order), so of two grants of a name the
one created second sees the first for as long as it lives. Every grant has
counted every holder older than itself and is counted by every younger one:
the holders never exceed the capacity a grant was made with, also while it is
lowered or moves between 1 and more (both recipes are counted). A younger Lock
node is never granted while ours lives (we are its predecessor, or it sees our
lease), and a grant that sees a younger Semaphore lease backs off, so each
token is above those of all grants before it, and no two live leases share a
slot. Under a race both sides may back off; a full lock answers None at once.

To save round trips, the slot is picked from this process's copy of the
Semaphore's lease list (the slot is in each node's name, ``<uuid>-slot<n>``;
our own grants and releases keep the copy current), and the check reads only
the Semaphore node and the Lock's stat: if the Semaphore's ``cversion`` moved
by exactly our create since the copy, nobody else came or went, so the copy is
true and our node is the youngest (its ``czxid`` is the ``pzxid``). Otherwise
the check lists the leases as well. A copy that shows the lock full is re-read
before answering None.

A Semaphore refuses a ``max_leases`` different from the one stored on its node
(``ValueError``); the backend stores the new capacity, under the Semaphore's
own lock, and retries. Once a name's stored value matched, the recipe's own
check is skipped (``assured_path``) and the stored value is re-read with the
check instead: a change by another process makes the next grant store its own
again. The capacity itself is always enforced by the check above.

A holder that dies frees its slot when ZooKeeper expires its session: after
the ``timeout`` option, rounded up to the server's next tick (``tickTime``, 2 s
by default). Keep ``timeout`` within the server's bounds (2 to 20 ticks by
default): the server would impose another, and the in-doubt window below is
computed from ours. ``renew`` does not write: the client's session heartbeat
keeps the nodes; ``renew`` checks that the node still exists in this session
and pushes ``expires_at`` one TTL ahead.

Foreign kazoo clients see the same recipes, but they do not run the check: one
that acquires the Semaphore directly is only counted against other Semaphore
holders, not against a capacity-1 ``Lock`` holder.

Error handling
==============

As kazoo's recipes recommend, the backend listens to the connection state.
:attr:`~kazoo.protocol.states.KazooState.SUSPENDED` puts every lease in doubt:
its ``expires_at`` is pulled in to the earliest moment the server could expire
the session (a third of the session timeout), so :meth:`Lease.is_valid` turns
False before another client can be granted the slot, unless a ``renew`` after
the reconnection finds the node still there and pushes it out again.
:attr:`~kazoo.protocol.states.KazooState.LOST` means the session expired and
every ephemeral node with it: each lease is marked lost, logged, and its
``on_lost`` callback is called (from a separate thread, never kazoo's own).
``renew`` itself only answers: False for a lease whose node is gone.

While the connection is down, every request fails at once instead of waiting in
kazoo's queue for a reconnection that may take minutes, so ``acquire`` on an
unreachable server raises :class:`~django_celery_adv.exceptions.LockError`
within ``connect_timeout`` seconds. A request cut off by a connection loss may
still have created its node on the server: the names touched by a failed
operation are swept for nodes of this session that no lease accounts for as
soon as the connection is back. Every kazoo error (and the recipes'
``ValueError``) becomes ``LockError``, chained with ``from``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import itertools
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import quote

from kazoo.client import KazooClient
from kazoo.exceptions import (
    ConnectionClosedError,
    KazooException,
    LockTimeout,
    NoNodeError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import KazooState, ZnodeStat
from kazoo.recipe.lock import Lock, Semaphore

from ...exceptions import LockError
from .base import Holder, Lease, LockBackend, from_timestamp, utcnow

logger = logging.getLogger(__name__)

#: What kazoo can raise from a call; the timeout is the connection's.
CLIENT_ERRORS = (KazooException, KazooTimeoutError)

#: Our Semaphore lease nodes are named ``<uuid>-slot<n>``.
_SLOT_NAME = re.compile(r"-slot(\d+)$")


class _Raced(enum.Enum):
    """A grant that backed off from a concurrent one: try again."""

    RACED = "raced"


_RACED = _Raced.RACED


def _decode(raw: bytes | None) -> dict[str, Any]:
    """A lease node's data: our JSON, or a foreign identifier as ``hostname``."""
    try:
        data = json.loads(raw.decode("utf-8")) if raw else {}
    except ValueError:
        return {"hostname": (raw or b"").decode("utf-8", "replace")}
    return data if isinstance(data, dict) else {}


def _max_leases(raw: bytes | None) -> int | None:
    """The Semaphore node's stored ``max_leases`` (None: not a number, as kazoo reads it)."""
    try:
        return int((raw or b"").decode("utf-8"))
    except ValueError:
        return None


class _FailFastClient(KazooClient):
    """A KazooClient whose requests fail at once while the connection is down.

    kazoo queues a request made while it reconnects and blocks its caller until
    the reconnection, which has no deadline; the recipes also clean up with
    blocking calls after a ``ConnectionLoss``. ``ConnectionClosedError`` is the
    one error ``KazooRetry`` re-raises without retrying, so the recipes stop too.
    """

    def _call(self, request: Any, async_object: Any) -> Any:
        if async_object is not None and not self.connected:
            async_object.set_exception(ConnectionClosedError("not connected to ZooKeeper"))
            return False
        return super()._call(request, async_object)


@dataclass
class _Handle:
    """What ``Lease.handle`` holds: the recipe and the path of the lease node."""

    recipe: Lock | Semaphore
    path: str
    session_id: int


@dataclass
class _View:
    """This process's copy of a Semaphore's lease list, true as of ``cversion``.

    Our own grants and releases keep it up to date; a grant trusts it only if
    the Semaphore's ``cversion`` shows that nothing else changed since.
    """

    czxid: int  # of the Semaphore node: a new node starts its cversion over
    cversion: int
    slots: dict[str, int | None]  # lease node name -> slot (None: a foreign lease)
    lock_held: bool  # the Lock had a node

    @property
    def count(self) -> int:
        return len(self.slots) + self.lock_held

    def free_slot(self, capacity: int) -> int:
        """The lowest slot that no lease has, below the capacity (which has room)."""
        taken = {slot for slot in self.slots.values() if slot is not None}
        free = (slot for slot in itertools.count() if slot not in taken)
        # Leases without a slot of ours (foreign ones, the Lock's) are listed
        # on the lowest free slots: leave those to them.
        unplaced = self.lock_held + sum(slot is None for slot in self.slots.values())
        taken.update(next(free) for _ in range(unplaced))
        return min(set(range(capacity)) - taken)


@dataclass
class _Node:
    path: str
    stat: ZnodeStat
    data: dict[str, Any]
    slot: int = -1


class ZooKeeperBackend(LockBackend):
    """Leases are ephemeral nodes of kazoo's Lock (capacity 1) or Semaphore.

    OPTIONS: ``hosts`` (required, kazoo's ``host:port,...`` string),
    ``root`` (default ``/celery-adv/locks``), ``timeout`` (session timeout in
    seconds, default 10), ``connect_timeout`` (default 3), ``guard_timeout``
    (longest wait behind another grant of the same name, and for a grant that
    keeps losing races, default 2).
    """

    required_options = ("hosts",)

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        self.hosts = str(self.options.get("hosts") or "")
        self.root = "/" + str(self.options.get("root") or "/celery-adv/locks").strip("/")
        self.session_timeout = float(self.options.get("timeout") or 10.0)
        self.connect_timeout = float(self.options.get("connect_timeout") or 3.0)
        self.guard_timeout = float(self.options.get("guard_timeout") or 2.0)
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        # Fresh locks too: one held by another thread at fork time stays held
        # forever in the child.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._zk: KazooClient | None = None
        self._name_locks: dict[str, threading.Lock] = {}
        self._held_lock = threading.Lock()
        self._held: dict[str, Lease] = {}
        self._dirty: set[str] = set()
        # Lock paths known to exist, and Semaphore paths whose stored
        # max_leases matched: the recipes' reads of them are skipped.
        self._ensured: set[str] = set()
        self._max_leases: dict[str, int] = {}
        self._views: dict[str, _View] = {}  # by Semaphore path, under _held_lock

    # -- client --------------------------------------------------------------

    def _client(self) -> KazooClient:
        if self._pid != os.getpid():
            # The parent's socket is shared with us: closing it would end the
            # parent's session, so the old client is only forgotten.
            self._reset_process_state()
        with self._lock:
            if self._zk is None:
                client = _FailFastClient(
                    hosts=self.hosts, timeout=self.session_timeout,
                    # Keep reconnecting, but never sleep minutes between tries.
                    connection_retry={"max_tries": -1, "delay": 0.1, "max_delay": 5.0},
                    command_retry={"max_tries": 3, "delay": 0.05, "max_delay": 0.5},
                )
                client.add_listener(lambda state: self._on_state(client, state))
                try:
                    client.start(timeout=self.connect_timeout)
                except CLIENT_ERRORS as e:
                    raise LockError(f"zookeeper lock backend {self.alias!r}: cannot connect "
                                    f"to {self.hosts} within {self.connect_timeout}s: {e}") from e
                self._zk = client
            return self._zk

    def _on_state(self, client: KazooClient, state: str) -> None:
        # Runs on kazoo's connection thread: must not block or call ZooKeeper.
        if client is not self._zk and self._zk is not None:
            return
        if state == KazooState.LOST:
            with self._held_lock:
                leases, self._held = list(self._held.values()), {}
                self._dirty.clear()  # the session's nodes went with it
            self._lose_all(leases)
        elif state == KazooState.SUSPENDED:
            # The server expires the session no sooner than a session timeout
            # after it last heard from us, and kazoo notices a silent
            # connection within two thirds of it: a third is left, minus
            # latency, before another client could be granted our slots.
            doubt = utcnow() + timedelta(seconds=max(0.0, self.session_timeout / 3 - 0.5))
            with self._held_lock:
                for lease in self._held.values():
                    lease.expires_at = min(lease.expires_at, doubt)
        elif state == KazooState.CONNECTED and self._dirty:
            client.handler.spawn(self._sweep, client)

    def _lose_all(self, leases: list[Lease], *, closing: bool = False) -> None:
        lost = [lease for lease in leases if lease.mark_lost()]
        if lost:
            logger.log(logging.INFO if closing else logging.ERROR,
                       "zookeeper lock backend %r: session %s, %d lease(s) lost: %s",
                       self.alias, "closed" if closing else "lost", len(lost),
                       ", ".join(lease.name for lease in lost))
            threading.Thread(target=self._call_on_lost, args=(lost,), daemon=True,
                             name="zookeeper-lock-lost").start()

    @staticmethod
    def _call_on_lost(leases: list[Lease]) -> None:
        for lease in leases:
            if lease.on_lost is None:
                continue
            try:
                lease.on_lost(lease)
            except Exception:
                logger.exception("on_lost callback of lock %r failed", lease.name)

    def close(self) -> None:
        with self._lock:
            client, self._zk = self._zk, None
        if client is not None and self._pid == os.getpid():
            # Closing the session deletes its nodes: what is still held is lost.
            with self._held_lock:
                leases, self._held = list(self._held.values()), {}
            self._lose_all(leases, closing=True)
            try:
                client.stop()
                client.close()
            except CLIENT_ERRORS:
                pass

    def describe(self) -> str:
        return f"zookeeper {self.hosts}{self.root}"

    # -- paths ---------------------------------------------------------------

    def _base(self, name: str) -> str:
        node = quote(name, safe="")
        if node in (".", ".."):  # not valid node names; quote() keeps dots
            node = node.replace(".", "%2E")
        return f"{self.root}/{node}"

    def _semaphore_path(self, name: str) -> str:
        return self._base(name) + "/semaphore"

    def _lock_path(self, name: str) -> str:
        return self._base(name) + "/lock"

    @contextmanager
    def _name_lock(self, name: str) -> Iterator[bool]:
        # Threads of this process queue here rather than on ZooKeeper; the
        # sweep also relies on it to see no grant of this name in flight.
        with self._lock:
            lock = self._name_locks.setdefault(name, threading.Lock())
        got = lock.acquire(timeout=self.guard_timeout)
        try:
            yield got
        finally:
            if got:
                lock.release()

    def _error(self, name: str, e: BaseException, *, wrote: bool = True) -> LockError:
        if wrote:
            # A write cut off mid-way may have left a node behind on the server.
            with self._held_lock:
                self._dirty.add(name)
            client = self._zk
            if client is not None and client.connected:
                # Reconnected already: the CONNECTED event that sweeps has passed.
                client.handler.spawn(self._sweep, client)
        return LockError(f"zookeeper lock backend {self.alias!r}, lock {name!r}: "
                         f"{type(e).__name__}: {e}")

    # -- the contract --------------------------------------------------------

    def acquire(self, name: str, capacity: int, holder: Holder, ttl: float) -> Lease | None:
        if capacity <= 0:
            return None
        client = self._client()
        grant = self._grant_lock if capacity == 1 else self._grant_semaphore
        with self._name_lock(name) as got:
            if not got:
                return None
            deadline = time.monotonic() + self.guard_timeout
            try:
                for attempt in itertools.count(1):
                    outcome = grant(client, name, capacity, holder, ttl)
                    if outcome is not _RACED:
                        return outcome
                    if time.monotonic() >= deadline:
                        return None  # lost every race: busy
                    time.sleep(random.uniform(0, 0.001 * min(attempt, 10)))
            except (*CLIENT_ERRORS, ValueError) as e:
                raise self._error(name, e) from e
        raise AssertionError("unreachable")

    def _grant_lock(self, client: KazooClient, name: str, capacity: int, holder: Holder,
                    ttl: float) -> Lease | _Raced | None:
        path = self._lock_path(name)
        recipe = Lock(client, path, self._identifier(holder, 0, ttl))
        recipe.assured_path = path in self._ensured
        try:
            gotten = recipe.acquire(blocking=False)
        except NoNodeError:
            if not recipe.assured_path:
                raise
            self._ensured.discard(path)  # deleted under us: create it again
            return _RACED
        self._ensured.add(path)
        if not gotten:
            self._not_gotten(client)
            return None  # held
        own = f"{path}/{recipe.node}"
        stat, semaphore = self._gather(client.exists_async(own),
                                       client.exists_async(self._semaphore_path(name)))
        stat = self._own_stat(client, stat)
        if semaphore is not None:
            if semaphore.numChildren:
                recipe.release()  # Semaphore leases held: the capacity (1) is taken
                return None
            if semaphore.pzxid > stat.czxid:
                recipe.release()  # a younger Semaphore lease may have been granted
                return _RACED
        return self._granted(client, name, 0, holder, ttl, recipe, own, stat.czxid)

    def _grant_semaphore(self, client: KazooClient, name: str, capacity: int, holder: Holder,
                         ttl: float) -> Lease | _Raced | None:
        path, lock_path = self._semaphore_path(name), self._lock_path(name)
        with self._held_lock:
            view = self._views.get(path)
            view = view and dataclasses.replace(view, slots=dict(view.slots))
        if view is None or view.count >= capacity:
            # Unknown, or full when last seen: list the leases (one round trip).
            view = self._list(client, path, lock_path)
            if view.count >= capacity:
                return None
        slot = view.free_slot(capacity)

        identifier = self._identifier(holder, slot, ttl)
        node = f"{uuid.uuid4().hex}-slot{slot}"
        semaphore, gotten, check_stored = self._acquire_semaphore(
            client, path, identifier, capacity, node)
        if not gotten:
            # There was room: the Semaphore's lock was busy, or leases were
            # granted since.
            self._forget_view(path)
            self._not_gotten(client)
            return _RACED
        own = semaphore.create_path
        stored, lock_stat = self._gather(client.get_async(path), client.exists_async(lock_path))
        if stored is None:
            raise ConnectionClosedError("semaphore node vanished right after a grant")
        data, parent = stored
        lock_held = bool(lock_stat and lock_stat.numChildren)
        if parent.numChildren + lock_held > capacity:
            # Granted since the view, or a Lock grant racing ours: the next
            # attempt lists the leases and answers "busy" if they are real.
            return self._back_off(semaphore, path)
        if parent.czxid == view.czxid and parent.cversion == view.cversion + 1:
            # Nothing but our create since the view: our node is the youngest
            # (its czxid is the pzxid) and the view's slots are the truth.
            token = parent.pzxid
            slots = {**view.slots, node: slot}
        else:
            # Others came or went meanwhile: look at them (one more round trip).
            stat, listing = self._gather(client.exists_async(own),
                                         client.get_children_async(path, include_data=True))
            stat = self._own_stat(client, stat if listing is not None else None)
            children, parent = listing
            if parent.pzxid > stat.czxid:
                return self._back_off(semaphore, path)  # a younger lease
            slots = self._slots(client, path, children)
            slots[node] = slot
            if any(s == slot for child, s in slots.items() if child != node):
                return self._back_off(semaphore, path)  # picked from a stale list
            token = stat.czxid
        if lock_held and slot == 0:
            return self._back_off(semaphore, path)  # the Lock's slot
        if check_stored and _max_leases(data) not in (None, capacity):
            self._max_leases.pop(path, None)  # changed elsewhere: the next grant stores ours
        with self._held_lock:
            self._views[path] = _View(czxid=parent.czxid, cversion=parent.cversion,
                                      slots=slots, lock_held=lock_held)
        return self._granted(client, name, slot, holder, ttl, semaphore, own, token)

    def _list(self, client: KazooClient, path: str, lock_path: str) -> _View:
        """The Semaphore's leases and their slots, and whether the Lock has a node."""
        listing, lock_stat = self._gather(client.get_children_async(path, include_data=True),
                                          client.exists_async(lock_path))
        children, stat = listing or ([], None)
        view = _View(czxid=stat.czxid if stat else 0, cversion=stat.cversion if stat else -1,
                     slots=self._slots(client, path, children),
                     lock_held=bool(lock_stat and lock_stat.numChildren))
        with self._held_lock:
            self._views[path] = view
        return dataclasses.replace(view, slots=dict(view.slots))

    def _forget_view(self, path: str) -> None:
        with self._held_lock:
            self._views.pop(path, None)

    def _back_off(self, semaphore: Semaphore, path: str) -> _Raced:
        """Give our lease node back: the caller tries again."""
        self._forget_view(path)
        semaphore.release()
        return _RACED

    @staticmethod
    def _identifier(holder: Holder, slot: int, ttl: float) -> str:
        return json.dumps({**holder.as_dict(), "slot": slot, "ttl": ttl})

    @staticmethod
    def _gather(*requests: Any) -> list[Any]:
        """Results of requests sent together (one round trip); None for a missing node."""
        results = []
        for request in requests:
            try:
                results.append(request.get())
            except NoNodeError:
                results.append(None)
        return results

    @staticmethod
    def _not_gotten(client: KazooClient) -> None:
        if not client.connected:
            raise ConnectionClosedError("connection lost during acquire")

    @staticmethod
    def _own_stat(client: KazooClient, stat: ZnodeStat | None) -> ZnodeStat:
        if stat is None or client.client_id is None:
            raise ConnectionClosedError("lease node vanished right after its creation")
        return stat

    def _slots(self, client: KazooClient, path: str, children: list[str]) -> dict[str, int | None]:
        """Each lease's slot: from its node name, else from its data (None: no slot)."""
        slots: dict[str, int | None] = {}
        unnamed = []
        for child in children:
            match = _SLOT_NAME.search(child)
            if match:
                slots[child] = int(match.group(1))
            else:
                unnamed.append(child)
        if unnamed:  # a foreign client's lease
            results = self._gather(*(client.get_async(f"{path}/{child}") for child in unnamed))
            for child, result in zip(unnamed, results, strict=True):
                slot = _decode(result[0]).get("slot") if result is not None else None
                slots[child] = slot if isinstance(slot, int) and slot >= 0 else None
        return slots

    def _granted(self, client: KazooClient, name: str, slot: int, holder: Holder, ttl: float,
                 recipe: Lock | Semaphore, path: str, token: int) -> Lease:
        session = client.client_id
        if session is None:
            raise ConnectionClosedError("connection lost during acquire")
        now = utcnow()
        lease = Lease(
            name=name, slot=slot, token=token, holder=holder, acquired_at=now,
            expires_at=now + timedelta(seconds=ttl), ttl=ttl, backend=self.alias,
            handle=_Handle(recipe=recipe, path=path, session_id=session[0]),
        )
        with self._held_lock:
            self._held[path] = lease
        return lease

    def _acquire_semaphore(self, client: KazooClient, path: str, identifier: str,
                           capacity: int, node: str) -> tuple[Semaphore, bool, bool]:
        """The recipe's acquire: (semaphore, gotten, stored max_leases left unchecked)."""
        for attempt in range(2):
            # The stored max_leases matched already: skip the recipe's reads of it.
            assured = self._max_leases.get(path) == capacity
            semaphore = Semaphore(client, path, identifier, max_leases=capacity)
            semaphore.create_path = f"{path}/{node}"  # the slot in the name: listed without reads
            semaphore.assured_path = assured
            try:
                gotten = semaphore.acquire(blocking=False)
            except NoNodeError:
                if not assured or attempt:
                    raise
                self._max_leases.pop(path, None)  # deleted under us: create it again
                continue
            except ValueError:
                if attempt:
                    raise
                try:
                    self._store_max_leases(client, semaphore, capacity)
                except LockTimeout:
                    return semaphore, False, False  # a foreign client is acquiring: busy
                continue
            finally:
                # Each Semaphore adds a session listener that only a LOST
                # state removes: without this the client collects one per grant.
                client.remove_listener(semaphore._watch_session)
            self._max_leases[path] = capacity
            return semaphore, gotten, assured
        raise AssertionError("unreachable")

    def _store_max_leases(self, client: KazooClient, semaphore: Semaphore,
                          capacity: int) -> None:
        # The capacity changed (an admin edit). Counting is done by our check,
        # so the stored number only has to agree with the new one; the
        # Semaphore's own lock keeps foreign clients from acquiring meanwhile.
        lock = Lock(client, semaphore.lock_path)
        if not lock.acquire(timeout=self.guard_timeout):
            raise LockTimeout(f"semaphore lock {semaphore.lock_path} is busy")
        try:
            client.set(semaphore.path, str(capacity).encode())
        finally:
            lock.release()

    def _read_leases(self, client: KazooClient, name: str) -> list[_Node]:
        """Live leases of both recipes, with a slot each (ours store one).

        Reads what ``Semaphore.lease_holders()`` and ``Lock.contenders()``
        read, plus each node's stat for its token and creation time.
        """
        nodes = self._children(client, self._semaphore_path(name))
        contenders = self._children(client, self._lock_path(name))
        # Lock contenders after the first are waiting (a foreign blocking
        # client), not holding.
        contenders.sort(key=lambda node: node.path[-10:])
        nodes.extend(contenders[:1])
        taken: set[int] = set()
        unplaced = []
        for node in sorted(nodes, key=lambda node: node.stat.czxid):
            slot = node.data.get("slot")
            if isinstance(slot, int) and slot >= 0 and slot not in taken:
                node.slot = slot
                taken.add(slot)
            else:
                unplaced.append(node)
        free = (slot for slot in range(len(nodes) * 2 + 1) if slot not in taken)
        for node, slot in zip(unplaced, free, strict=False):
            node.slot = slot
        return sorted(nodes, key=lambda node: node.slot)

    @staticmethod
    def _children(client: KazooClient, path: str) -> list[_Node]:
        try:
            children = client.get_children(path)
        except NoNodeError:
            return []
        nodes = []
        for child in children:
            try:
                raw, stat = client.get(f"{path}/{child}")
            except NoNodeError:
                continue  # released while we listed
            nodes.append(_Node(path=f"{path}/{child}", stat=stat, data=_decode(raw)))
        return nodes

    def release(self, lease: Lease) -> None:
        handle = lease.handle
        if not isinstance(handle, _Handle):
            return
        with self._held_lock:
            self._held.pop(handle.path, None)
        if lease.lost:
            return  # its node went with the session, or renew already removed it
        client = self._client()
        parent, _, child = handle.path.rpartition("/")
        try:
            # The node's name is unique to this grant: this cannot free a slot
            # that someone else holds now.
            client.retry(client.delete, handle.path)
        except NoNodeError:
            return  # deleted by someone else: the view no longer matches anyway
        except CLIENT_ERRORS as e:
            self._forget_view(parent)
            raise self._error(lease.name, e) from e
        with self._held_lock:
            view = self._views.get(parent)
            if view is not None and view.slots.pop(child, False) is not False:
                view.cversion += 1  # our delete, the only change it missed

    def renew(self, lease: Lease) -> bool:
        handle = lease.handle
        if lease.lost or not isinstance(handle, _Handle):
            return False
        client = self._client()
        started = utcnow()
        try:
            stat = client.retry(client.exists, handle.path)
        except CLIENT_ERRORS as e:
            raise self._error(lease.name, e, wrote=False) from e
        session = client.client_id
        if (stat is None or stat.czxid != lease.token or session is None
                or stat.ephemeralOwner != session[0]):
            # Gone (force-released, or its session ended): the caller reports
            # the loss; the lease must not be counted as ours any more.
            with self._held_lock:
                self._held.pop(handle.path, None)
            return False
        lease.expires_at = started + timedelta(seconds=lease.ttl)
        return True

    def holders(self, name: str) -> list[Lease]:
        client = self._client()
        try:
            nodes = self._read_leases(client, name)
        except CLIENT_ERRORS as e:
            raise self._error(name, e, wrote=False) from e
        # A listed lease lives as long as its holder's session; were the
        # holder to die now, the slot would be free after the session timeout.
        horizon = utcnow() + timedelta(seconds=self.session_timeout)
        leases = []
        for node in nodes:
            ttl = node.data.get("ttl")
            leases.append(Lease(
                name=name, slot=node.slot, token=node.stat.czxid,
                holder=Holder.from_dict(node.data),
                acquired_at=from_timestamp(node.stat.created), expires_at=horizon,
                ttl=float(ttl) if isinstance(ttl, int | float) else self.session_timeout,
                backend=self.alias,
            ))
        return leases

    def force_release(self, name: str, token: int) -> bool:
        client = self._client()
        try:
            for node in self._read_leases(client, name):
                if node.stat.czxid == token:
                    try:
                        # The version pins the node we looked at.
                        client.delete(node.path, version=node.stat.version)
                    except NoNodeError:
                        return False
                    return True
        except CLIENT_ERRORS as e:
            raise self._error(name, e, wrote=False) from e
        return False

    def _sweep(self, client: KazooClient) -> None:
        """Delete nodes of this session that no lease accounts for.

        Left by a request cut off by a connection loss; they would hold a slot
        (or the Semaphore's lock) for as long as this session lives.
        """
        session = client.client_id
        if session is None:
            return  # disconnected again: the next CONNECTED event sweeps
        with self._held_lock:
            names, self._dirty = self._dirty, set()
        for name in names:
            with self._name_lock(name) as got:
                if got:
                    got = self._sweep_name(client, name, session[0])
            if not got:
                with self._held_lock:
                    self._dirty.add(name)

    def _sweep_name(self, client: KazooClient, name: str, session_id: int) -> bool:
        base = self._base(name)
        try:
            for path in (f"{base}/semaphore", f"{base}/semaphore-__lock__", f"{base}/lock"):
                for node in self._children(client, path):
                    with self._held_lock:
                        held = node.path in self._held
                    if node.stat.ephemeralOwner == session_id and not held:
                        logger.warning("deleting orphan lock node %s", node.path)
                        with contextlib.suppress(NoNodeError):
                            client.delete(node.path)
        except CLIENT_ERRORS:
            return False
        return True
