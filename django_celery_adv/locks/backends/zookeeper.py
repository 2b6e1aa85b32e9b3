"""Lock backend on ZooKeeper: kazoo's ``Semaphore`` recipe, for every capacity.

A lock is the Semaphore at ``<root>/<quoted name>/semaphore``. A grant takes the
recipe's own lock, counts the leases and creates its node, as plain kazoo does:
a plain ``kazoo.recipe.lock.Semaphore`` on the same path shares the count. A
lease node is ephemeral, named ``<uuid>-slot<n>``, holds the holder as JSON
(``task_id``, ``hostname``, ``pid``, ``slot``, ``ttl``; ``lease_holders()``
lists it), and its ``czxid`` is the fencing token.

Guarantees
==========

* Never more leases than the capacity, plain kazoo ones included; a lowered
  capacity grants nothing until below it. Tokens grow (zxid order). The slot is
  the lowest free one (a plain kazoo lease takes one too).
* A full lock answers None without a write (leases are counted before the
  recipe runs): polls burn no sequence number. A count found full is kept, with
  a watch, until the leases change: meanwhile a poll costs no round trip.
* A ``max_leases`` stored by another capacity (kazoo's ``ValueError``) is
  replaced under the Semaphore's own lock; plain clients use the stored one.
* A dead holder's slot frees when its session expires: ``timeout`` rounded up
  to the server's tick (keep it within the server's 2 to 20 ticks).
* Validity is the session's, not the lock TTL's: ``timeout`` less a tenth from
  when the last request that found the node was sent (the grant, or ``renew``:
  one ``exists``), so the caller must renew within that.
* One client per process (``PerProcess``): a forked child has its own session
  and never releases, nor reports lost, its parent's leases.

Error handling
==============

``SUSPENDED`` makes every lease invalid at once (Curator's rule) until a
``renew`` after the reconnection finds its node; ``LOST`` (session expired,
nodes gone) marks every lease lost, logs it and calls ``on_lost`` from a thread
of ours. While disconnected, requests fail at once instead of waiting for a
reconnection, so a down server raises ``LockError`` (``translate_errors``)
within ``connect_timeout``. A write whose reply a connection loss swallowed may
leave a node in a session that survives: after each reconnection, nodes of this
session that no lease owns are deleted. For the same reason ``release`` deletes
the node even of a lease marked lost, and ``renew`` one it finds.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import quote

from kazoo import exceptions as zk
from kazoo.client import KazooClient
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import KazooState, ZnodeStat
from kazoo.recipe.lock import Semaphore

from ...process import PerProcess
from .base import Holder, Lease, LockBackend, from_timestamp, utcnow

logger = logging.getLogger(__name__)

_SLOT = re.compile(r"-slot(\d+)$")
#: Share of the session timeout not counted on (the server's clock and ours
#: run at slightly different rates).
MARGIN = 0.1


class _FailFastClient(KazooClient):
    """Requests fail at once while disconnected (kazoo queues them with no
    deadline); ``KazooRetry`` never retries ``ConnectionClosedError``.

    Also keeps the session timeout the server agreed to: a server caps what a
    client asks for (20 ticks by default), and a lease must not count on more
    than the server does. kazoo logs it but does not keep it; its connection's
    ``_connect`` returns two thirds of it as the read timeout (kazoo 2.x).
    """

    #: Seconds, from the server's reply to the last connect; None before one.
    negotiated_timeout: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        connect = self._connection._connect

        def connect_and_keep_the_timeout(*connect_args: Any) -> Any:
            read_timeout, connect_timeout = connect(*connect_args)
            self.negotiated_timeout = read_timeout * 1.5 / 1000
            return read_timeout, connect_timeout

        self._connection._connect = connect_and_keep_the_timeout

    def _call(self, request: Any, async_object: Any) -> Any:
        if async_object is not None and not self.connected:
            async_object.set_exception(zk.ConnectionClosedError("not connected to ZooKeeper"))
            return False
        return super()._call(request, async_object)


class _Recipe(Semaphore):
    """kazoo's Semaphore granting the lowest free slot, or nothing (no waiting)."""

    def __init__(self, client: KazooClient, path: str, holder: dict, capacity: int) -> None:
        super().__init__(client, path, json.dumps(holder), max_leases=capacity)
        self.holder, self.slot, self.stat = holder, -1, ZnodeStat(*[0] * 11)

    def _get_lease(self, data: Any = None) -> bool:  # under the Semaphore's lock
        if self._session_expired:  # a new session: the lock we hold went with the old
            raise zk.ConnectionClosedError("session lost")
        children = self.client.get_children(self.path)
        if len(children) >= self.max_leases:
            raise zk.CancelledError("full")  # the caller answers None at once
        self.slot = _place(children)[1]
        self.create_path = f"{self.path}/{uuid.uuid4().hex}-slot{self.slot}"
        self.data = json.dumps({**self.holder, "slot": self.slot}).encode()
        _, self.stat = self.client.create(self.create_path, self.data, ephemeral=True,
                                          include_data=True)
        return True


def _place(children: list[str]) -> tuple[dict[str, int], int]:
    """Each lease node's slot (its own, else the lowest free), and the lowest left free."""
    slots: dict[str, int] = {}
    for child in sorted(children):
        match = _SLOT.search(child)
        if match and int(match.group(1)) not in slots.values():
            slots[child] = int(match.group(1))
    free = (slot for slot in itertools.count() if slot not in slots.values())
    slots.update({child: next(free) for child in sorted(children) if child not in slots})
    return slots, next(free)


def _read(client: KazooClient, folder: str) -> list[tuple[str, bytes, ZnodeStat]]:
    """(name, data, stat) of each child of ``folder``."""
    nodes = []
    with contextlib.suppress(zk.NoNodeError):
        for child in client.get_children(folder):
            with contextlib.suppress(zk.NoNodeError):  # gone while we read
                nodes.append((child, *client.get(f"{folder}/{child}")))
    return nodes


def _decode(raw: bytes) -> dict[str, Any]:
    """A lease node's data: our JSON, or a plain kazoo client's identifier."""
    with contextlib.suppress(ValueError):
        data = json.loads(raw)
        if isinstance(data, dict):
            return data
    return {"hostname": raw.decode("utf-8", "replace")}


@dataclass(eq=False)
class _Session:
    """This process's client and what it knows (a forked child makes its own)."""

    client: KazooClient
    lock: threading.Lock = field(default_factory=threading.Lock)
    held: dict[str, Lease] = field(default_factory=dict)  # by lease node path
    full: dict[str, int] = field(default_factory=dict)  # lease count while a watch is set
    stored: dict[str, int] = field(default_factory=dict)  # max_leases known stored
    turns: dict[str, threading.Lock] = field(default_factory=dict)  # per Semaphore used

    def changed(self, event: Any) -> None:
        with self.lock:
            self.full.pop(event.path, None)

    def turn(self, path: str) -> threading.Lock:
        with self.lock:
            return self.turns.setdefault(path, threading.Lock())


class ZooKeeperBackend(LockBackend):
    """OPTIONS: ``hosts`` (required, kazoo's ``host:port,...``), ``root`` (default
    ``/celery-adv/locks``), ``timeout`` (session timeout, default 10 s),
    ``connect_timeout`` (default 3 s), ``guard_timeout`` (longest wait for the
    Semaphore's lock, default 2 s)."""

    required_options = ("hosts",)
    client_errors = (zk.KazooException, KazooTimeoutError)

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        self.hosts = str(self.options.get("hosts") or "")
        self.root = "/" + str(self.options.get("root") or "/celery-adv/locks").strip("/")
        self.session_timeout = float(self.options.get("timeout") or 10.0)
        self.connect_timeout = float(self.options.get("connect_timeout") or 3.0)
        self.guard_timeout = float(self.options.get("guard_timeout") or 2.0)
        self._session = PerProcess(self._connect, self._end)

    def describe(self) -> str:
        return f"zookeeper {self.hosts}{self.root}"

    def _client(self) -> KazooClient:
        return self._session.get().client

    def _path(self, name: str) -> str:
        node = quote(name, safe="")
        return f"{self.root}/{node.replace('.', '%2E') if node in ('.', '..') else node}/semaphore"

    def acquire(self, name: str, capacity: int, holder: Holder, ttl: float) -> Lease | None:
        if capacity <= 0:
            return None  # paused
        session, path = self._session.get(), self._path(name)
        if session.full.get(path, -1) >= capacity:
            return None  # counted full, and no change seen since
        turn = session.turn(path)  # threads of this process queue here, not on the server
        if not turn.acquire(timeout=self.guard_timeout):
            return None
        try:
            sent_at = time.monotonic()
            with self.translate_errors(name):
                recipe = self._grant(session, path, capacity, {**holder.as_dict(), "ttl": ttl})
                if recipe is None:
                    return None
                acquired_at = from_timestamp(recipe.stat.ctime / 1000)  # the server's clock
                lease = Lease(name=name, slot=recipe.slot, token=recipe.stat.czxid,
                              holder=holder, acquired_at=acquired_at, expires_at=acquired_at,
                              ttl=ttl, backend=self.alias, handle=recipe.create_path)
                self._confirm(session, lease, sent_at)
                with session.lock:
                    session.held[recipe.create_path] = lease
                return lease
        finally:
            turn.release()

    def _grant(self, session: _Session, path: str, capacity: int, holder: dict) -> _Recipe | None:
        client = session.client
        try:
            count = len(client.get_children(path))
        except zk.NoNodeError:  # the recipe creates it, with our max_leases
            count = 0
            session.stored.pop(path, None)
        if count >= capacity:
            # Count again, with a watch that drops the count when the leases
            # change (or the placeholder, if it fires before the count is in).
            session.full[path] = -1
            count = len(client.get_children(path, watch=session.changed))
            with session.lock:
                if path in session.full:
                    session.full[path] = count
            if count >= capacity:
                return None
        recipe = _Recipe(client, path, holder, capacity)
        recipe.assured_path = session.stored.get(path) == capacity  # skips kazoo's check
        try:
            try:
                granted = recipe.acquire(timeout=self.guard_timeout)
            except ValueError:  # another capacity is stored: store ours, under its lock
                lock = client.Lock(recipe.lock_path)
                if not lock.acquire(timeout=self.guard_timeout):
                    return None
                try:
                    client.set(path, str(capacity).encode())
                finally:
                    lock.release()
                recipe.assured_path = True
                granted = recipe.acquire(timeout=self.guard_timeout)
        except (zk.CancelledError, zk.LockTimeout):  # full meanwhile, or its lock stayed busy
            return None
        finally:  # each Semaphore adds a session listener that only LOST removes
            client.remove_listener(recipe._watch_session)
        # kazoo's Lock gives up quietly (False) when a connection loss interrupts
        # it; a recipe that created no lease node must never become a lease.
        if not granted or not recipe.stat.czxid:
            return None
        session.stored[path] = capacity
        return recipe

    def _confirm(self, session: _Session, lease: Lease, sent_at: float) -> None:
        agreed = session.client.negotiated_timeout or self.session_timeout
        lease.confirm(sent_at, min(self.session_timeout, agreed) * (1 - MARGIN))
        lease.expires_at = utcnow() + timedelta(seconds=lease.ttl)
        if not session.client.connected:
            lease.valid_until = 0.0  # SUSPENDED meanwhile: its listener may have run first

    def release(self, lease: Lease) -> None:
        if lease.owner_pid != os.getpid():
            return  # inherited over fork: its own process releases it
        session = self._session.get()
        with session.lock:
            held = session.held.pop(lease.handle, None) is not None
            session.full.pop(str(lease.handle).rpartition("/")[0], None)
        if isinstance(lease.handle, str) and (held or not lease.lost):
            # Even if marked lost: the node is this grant's alone (a unique
            # name) and lives on while the session that created it does.
            with self.translate_errors(lease.name), contextlib.suppress(zk.NoNodeError):
                session.client.delete(lease.handle)

    def renew(self, lease: Lease) -> bool:
        session = self._session.get()
        client = session.client
        if not isinstance(lease.handle, str) or (lease.lost and lease.handle not in session.held):
            return False  # not ours, or gone with its session
        sent_at = time.monotonic()
        with self.translate_errors(lease.name):
            stat, owner = client.exists(lease.handle), client.client_id
            if owner is None:
                raise zk.ConnectionClosedError("connection lost during renew")
            ours = stat is not None and stat.ephemeralOwner == owner[0]
            if ours and not lease.lost:
                self._confirm(session, lease, sent_at)
                return True
            with session.lock:
                session.held.pop(lease.handle, None)
            if ours:  # reported lost while the session kept the node: free the slot
                with contextlib.suppress(zk.NoNodeError):
                    client.delete(lease.handle)
        return False

    def holders(self, name: str) -> list[Lease]:
        with self.translate_errors(name):
            nodes = _read(self._client(), self._path(name))
        slots, _ = _place([child for child, _, _ in nodes])
        horizon = utcnow() + timedelta(seconds=self.session_timeout)  # if the holder died now
        leases = []
        for child, raw, stat in nodes:
            data = _decode(raw)
            ttl = data.get("ttl")
            leases.append(Lease(
                name=name, slot=slots[child], token=stat.czxid, holder=Holder.from_dict(data),
                acquired_at=from_timestamp(stat.ctime / 1000), expires_at=horizon,
                ttl=float(ttl) if isinstance(ttl, int | float) else self.session_timeout,
                backend=self.alias))
        return sorted(leases, key=lambda lease: lease.slot)

    def force_release(self, name: str, token: int) -> bool:
        client, path = self._client(), self._path(name)
        with self.translate_errors(name):
            for child, _, stat in _read(client, path):
                if stat.czxid == token:
                    self._session.get().full.pop(path, None)
                    with contextlib.suppress(zk.NoNodeError):
                        client.delete(f"{path}/{child}", version=stat.version)
                        return True
        return False

    def close(self) -> None:
        self._session.close()

    # -- the session: connection, its states, orphans ------------------------

    def _connect(self) -> _Session:
        client = _FailFastClient(
            hosts=self.hosts, timeout=self.session_timeout,
            # Reconnect forever, never minutes apart; never retry a request:
            # the caller (the api layer's poll or heartbeat) does.
            connection_retry={"max_tries": -1, "delay": 0.1, "max_delay": 1.0},
            command_retry={"max_tries": 1})
        session = _Session(client)
        client.add_listener(lambda state: self._on_state(session, state))
        try:
            with self.translate_errors():
                client.start(timeout=self.connect_timeout)
        except Exception:
            client.stop()
            client.close()
            raise
        return session

    def _end(self, session: _Session) -> None:
        with session.lock:  # closing the session deletes its nodes
            leases, session.held = list(session.held.values()), {}
        self._lose(leases, "closed")
        with contextlib.suppress(*self.client_errors):
            session.client.stop()
            session.client.close()

    def _on_state(self, session: _Session, state: str) -> None:
        # On kazoo's connection thread: must neither block nor call ZooKeeper.
        with session.lock:
            session.full.clear()  # a watch may not survive: count again
            leases = list(session.held.values())
            if state == KazooState.LOST:  # the session's nodes went with it
                session.held = {}
        if state == KazooState.SUSPENDED:
            for lease in leases:
                lease.valid_until = 0.0  # not held until a renew finds the node
        elif state == KazooState.LOST:
            self._lose(leases, "lost")
        elif session.turns:  # CONNECTED again
            session.client.handler.spawn(self._sweep, session)

    def _lose(self, leases: list[Lease], how: str) -> None:
        lost = [lease for lease in leases if lease.mark_lost()]
        if lost:
            logger.log(logging.INFO if how == "closed" else logging.ERROR,
                       "zookeeper lock backend %r: session %s, %d lease(s) lost: %s",
                       self.alias, how, len(lost), ", ".join(lease.name for lease in lost))
            threading.Thread(target=_report_lost, args=(lost,), daemon=True,
                             name="zookeeper-lock-lost").start()

    def _sweep(self, session: _Session) -> None:
        """Delete the nodes of this session that no lease nor grant in flight owns."""
        client, owner = session.client, session.client.client_id
        with session.lock:
            paths = list(session.turns) if owner else []  # else the next CONNECTED sweeps
        for path in paths:
            with session.turn(path), contextlib.suppress(*self.client_errors):
                for folder in (path, f"{path}-__lock__"):
                    for child, _, stat in _read(client, folder):
                        node = f"{folder}/{child}"
                        if stat.ephemeralOwner == owner[0] and node not in session.held:
                            logger.warning("deleting orphan lock node %s", node)
                            client.delete(node)


def _report_lost(leases: list[Lease]) -> None:
    for lease in leases:
        try:
            if lease.on_lost is not None:
                lease.on_lost(lease)
        except Exception:
            logger.exception("on_lost callback of lock %r failed", lease.name)
