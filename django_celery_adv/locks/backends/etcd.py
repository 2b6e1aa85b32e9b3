"""Lock backend on etcd (v3 API through its HTTP gateway, with ``etcd3gw``).

etcd has no semaphore recipe, so this module is one. A lock name owns

* ``<prefix><quoted name>/slots/<i>``: one key per held slot, its value the
  holder as JSON (``task_id``, ``hostname``, ``pid``, ``ttl``, ``acquired_at``,
  ``expires``), attached to an etcd lease of its own;
* ``<prefix><quoted name>/guard``: an empty key rewritten by every grant.

A grant reads both in one range, counts *every* live slot key (also those above
a capacity that an operator just lowered), and then commits one transaction:
``guard`` unchanged since the read (``mod_revision``) and the slot key absent
(``create_revision == 0``) => put the slot key with the lease, rewrite
``guard``. Two grants that read the same state cannot both commit, so the
count they checked is still true when they write; releases and expiries only
lower it. A grant that loses the race re-reads (the failed transaction returns
the fresh state) and tries again a few times. The fencing token is the
revision of the granting transaction, which is the slot key's
``create_revision``: revisions only grow.

Expiry has two layers. The etcd lease removes the keys of a holder that
vanished, but etcd TTLs are whole seconds with a server minimum (2 s by
default) and expired leases are swept every 500 ms, so a slot would stay taken
up to a second past a short TTL. Each key therefore also stores ``expires``
(the holder's ``expires_at``, which ``renew`` rewrites); a grant deletes keys
past it, comparing their ``mod_revision`` so that a renewal in between wins.
As with the database backend, hosts sharing a lock must keep their clocks in
sync (NTP) to within a small part of the TTL.

``renew`` is a lease keep-alive plus a transaction that rewrites the value only
if the key is still the one created for this lease (``create_revision`` ==
token); ``release`` revokes the lease, so the key goes with it and a slot
granted to anyone else is never touched. etcd3gw's own ``Lock`` is not used: it
leaks the lease of a failed acquire and does not revoke it on release.

Error handling
==============

Every failure of the HTTP gateway (connection refused, timeout, a 5xx, a
response it cannot parse) becomes :class:`~django_celery_adv.exceptions.LockError`,
chained with ``from``. Requests time out after ``timeout`` seconds (default
5), so a server that is down or hung makes ``acquire`` fail instead of block.
A lease granted for an ``acquire`` that then fails or finds no free slot is
revoked before returning; if even the revoke fails, the lease holds no key
(or, if the transaction's outcome is unknown, at most the one it wrote, which
expires with it). A revoke of a lease that etcd no longer knows is not an
error, and a keep-alive of one means the lease was lost: ``renew`` returns False.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import threading
import time
from base64 import b64decode, b64encode
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception
from etcd3gw.lease import Lease as EtcdLease
from requests.adapters import HTTPAdapter

from ...exceptions import LockError
from .base import Holder, Lease, LockBackend, from_timestamp, utcnow

CLIENT_ERRORS = (Etcd3Exception, requests.RequestException, KeyError, ValueError)

#: Transactions a grant tries before it reports the lock busy.
GRANT_ATTEMPTS = 10


def _b64(data: bytes) -> str:
    return b64encode(data).decode("ascii")


def _prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"  # every key
    end[-1] += 1
    return bytes(end)


@dataclass
class _State:
    """One read of a lock name: the guard's revision and the slot keys."""

    guard_revision: int = 0
    live: dict[int, dict[str, Any]] = field(default_factory=dict)
    expired: list[dict[str, Any]] = field(default_factory=list)


def _lease_not_found(e: Etcd3Exception) -> bool:
    return "lease not found" in str(e.detail_text or "")


class EtcdBackend(LockBackend):
    """Leases are slot keys attached to etcd leases; see the module docstring.

    OPTIONS: ``host`` (default 127.0.0.1), ``port`` (2379), ``prefix``
    (``/celery-adv/locks/``), ``protocol`` (``http``), ``ca_cert``,
    ``cert_key`` + ``cert_cert`` (client certificate), ``timeout`` (seconds
    per request, default 5), ``pool_size`` (HTTP connections kept, default 32).
    """

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        self.host = str(self.options.get("host") or "127.0.0.1")
        self.port = int(self.options.get("port") or 2379)
        self.protocol = str(self.options.get("protocol") or "http")
        self.prefix = str(self.options.get("prefix") or "/celery-adv/locks/")
        self.timeout = float(self.options.get("timeout") or 5.0)
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._etcd: Etcd3Client | None = None

    def _client(self) -> Etcd3Client:
        if self._pid != os.getpid():
            # The parent's pooled sockets are shared with us: start afresh.
            self._reset_process_state()
        with self._lock:
            if self._etcd is None:
                session = requests.Session()
                # One session serves every thread: keep a connection per thread
                # instead of requests' default 10 (it would discard the rest).
                size = int(self.options.get("pool_size") or 32)
                adapter = HTTPAdapter(pool_connections=size, pool_maxsize=size)
                session.mount("http://", adapter)
                session.mount("https://", adapter)
                if self.options.get("ca_cert"):
                    session.verify = self.options["ca_cert"]
                if self.options.get("cert_key") and self.options.get("cert_cert"):
                    session.cert = (self.options["cert_cert"], self.options["cert_key"])
                self._etcd = Etcd3Client(host=self.host, port=self.port,
                                         protocol=self.protocol, timeout=self.timeout,
                                         session=session)
            return self._etcd

    def close(self) -> None:
        with self._lock:
            client, self._etcd = self._etcd, None
        if client is not None and self._pid == os.getpid():
            client.session.close()

    def describe(self) -> str:
        return f"etcd {self.protocol}://{self.host}:{self.port} {self.prefix}"

    def _error(self, name: str, e: BaseException) -> LockError:
        detail = getattr(e, "detail_text", None) or e
        return LockError(f"etcd lock backend {self.alias!r}, lock {name!r}: "
                         f"{type(e).__name__}: {detail}")

    # -- keys ----------------------------------------------------------------

    def _base(self, name: str) -> bytes:
        # Quoted so that a "/" in a name cannot reach into another name's keys.
        return f"{self.prefix}{quote(name, safe='')}/".encode()

    def _range(self, client: Etcd3Client, prefix: bytes) -> list[dict[str, Any]]:
        result = client.post(client.get_url("/kv/range"), json={
            "key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))})
        return list(result.get("kvs", []))

    @staticmethod
    def _decode(kv: dict[str, Any]) -> dict[str, Any]:
        try:
            data = json.loads(b64decode(kv.get("value", "")) or b"{}")
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _state(self, kvs: list[dict[str, Any]], base: bytes) -> _State:
        state = _State()
        now = time.time()
        foreign = -1
        for kv in kvs:
            key = b64decode(kv["key"])
            if key == base + b"guard":
                state.guard_revision = int(kv.get("mod_revision", 0))
                continue
            if not key.startswith(base + b"slots/"):
                continue
            expires = self._decode(kv).get("expires")
            if isinstance(expires, int | float) and expires <= now:
                state.expired.append(kv)
                continue
            try:
                slot = int(key[len(base) + 6:])
            except ValueError:
                slot, foreign = foreign, foreign - 1  # not ours, yet counted
            state.live[slot] = kv
        return state

    # -- the contract --------------------------------------------------------

    def acquire(self, name: str, capacity: int, holder: Holder, ttl: float) -> Lease | None:
        if capacity <= 0:
            return None
        client = self._client()
        base = self._base(name)
        etcd_lease: EtcdLease | None = None
        lease: Lease | None = None
        try:
            state = self._state(self._range(client, base), base)
            for attempt in range(GRANT_ATTEMPTS):
                if len(state.live) >= capacity:
                    return None
                if state.expired:
                    state = self._reap(client, base, state)
                    continue
                if etcd_lease is None:
                    granted_at = utcnow()  # before the grant: expiry never later than etcd's
                    etcd_lease = client.lease(max(1, math.ceil(ttl)))
                slot = min(set(range(capacity)) - set(state.live))
                lease = Lease(name=name, slot=slot, token=0, holder=holder,
                              acquired_at=granted_at,
                              expires_at=granted_at + timedelta(seconds=ttl), ttl=ttl,
                              backend=self.alias, handle=etcd_lease.id)
                result = self._commit(client, base, state, lease)
                if result.get("succeeded"):
                    lease.token = int(result["header"]["revision"])
                    return lease
                lease = None
                # Another grant committed since our read: count again.
                fresh = result["responses"][0]["response_range"].get("kvs", [])
                state = self._state(fresh, base)
                time.sleep(random.uniform(0, 0.002 * (attempt + 1)))
            return None
        except CLIENT_ERRORS as e:
            lease = None
            raise self._error(name, e) from e
        finally:
            if lease is None and etcd_lease is not None:
                self._revoke(etcd_lease)

    def _commit(self, client: Etcd3Client, base: bytes, state: _State,
                lease: Lease) -> dict[str, Any]:
        guard = _b64(base + b"guard")
        key = _b64(self._slot_key(lease))
        return client.transaction({
            "compare": [
                {"key": guard, "target": "MOD", "result": "EQUAL",
                 "mod_revision": state.guard_revision},
                {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": 0},
            ],
            "success": [
                {"request_put": {"key": key, "value": _b64(self._value(lease)),
                                 "lease": lease.handle}},
                {"request_put": {"key": guard, "value": ""}},
            ],
            "failure": [{"request_range": {"key": _b64(base),
                                           "range_end": _b64(_prefix_end(base))}}],
        })

    def _reap(self, client: Etcd3Client, base: bytes, state: _State) -> _State:
        """Delete the keys whose holders let them expire; return the fresh state."""
        # Each delete is conditional on the key being unchanged since we saw
        # it expired: a renewal in between keeps it.
        client.transaction({
            "compare": [{"key": kv["key"], "target": "MOD", "result": "EQUAL",
                         "mod_revision": int(kv["mod_revision"])} for kv in state.expired],
            "success": [{"request_delete_range": {"key": kv["key"]}} for kv in state.expired],
            "failure": [],
        })
        for kv in state.expired:
            if kv.get("lease"):
                self._revoke(EtcdLease(int(kv["lease"]), client=client))
        return self._state(self._range(client, base), base)

    def _slot_key(self, lease: Lease) -> bytes:
        return self._base(lease.name) + b"slots/" + str(lease.slot).encode()

    @staticmethod
    def _value(lease: Lease) -> bytes:
        return json.dumps({**lease.holder.as_dict(), "ttl": lease.ttl,
                           "acquired_at": lease.acquired_at.timestamp(),
                           "expires": lease.expires_at.timestamp()}).encode()

    @staticmethod
    def _revoke(etcd_lease: EtcdLease) -> None:
        # Best effort: it holds no key we count on and expires after its TTL.
        with contextlib.suppress(*CLIENT_ERRORS):
            etcd_lease.revoke()

    def release(self, lease: Lease) -> None:
        if not isinstance(lease.handle, int):
            return
        try:
            EtcdLease(lease.handle, client=self._client()).revoke()
        except Etcd3Exception as e:
            if not _lease_not_found(e):
                raise self._error(lease.name, e) from e
        except CLIENT_ERRORS as e:
            raise self._error(lease.name, e) from e

    def renew(self, lease: Lease) -> bool:
        if lease.lost or not isinstance(lease.handle, int):
            return False
        client = self._client()
        etcd_lease = EtcdLease(lease.handle, client=client)
        started = utcnow()
        previous = lease.expires_at
        try:
            # A keep-alive cannot revive a lease that expired: etcd forgot it.
            if etcd_lease.refresh() <= 0:
                return False
            lease.expires_at = started + timedelta(seconds=lease.ttl)
            key = _b64(self._slot_key(lease))
            # Still the key this grant created (not reaped, not force-released
            # and granted again): only then is the new expiry written.
            result = client.transaction({
                "compare": [{"key": key, "target": "CREATE", "result": "EQUAL",
                             "create_revision": lease.token}],
                "success": [{"request_put": {"key": key, "value": _b64(self._value(lease)),
                                             "lease": lease.handle}}],
                "failure": [],
            })
        except CLIENT_ERRORS as e:
            lease.expires_at = previous
            raise self._error(lease.name, e) from e
        if not result.get("succeeded"):
            lease.expires_at = previous
            self._revoke(etcd_lease)  # it holds no key of ours any more
            return False
        return True

    def holders(self, name: str) -> list[Lease]:
        client = self._client()
        base = self._base(name)
        try:
            state = self._state(self._range(client, base + b"slots/"), base)
        except CLIENT_ERRORS as e:
            raise self._error(name, e) from e
        leases = []
        now = utcnow()
        for slot, kv in sorted(state.live.items()):
            data = self._decode(kv)
            ttl, acquired, expires = data.get("ttl"), data.get("acquired_at"), data.get("expires")
            leases.append(Lease(
                name=name, slot=slot, token=int(kv["create_revision"]),
                holder=Holder.from_dict(data),
                acquired_at=from_timestamp(acquired) if isinstance(acquired, int | float) else now,
                expires_at=from_timestamp(expires) if isinstance(expires, int | float) else now,
                ttl=float(ttl) if isinstance(ttl, int | float) else 0.0,
                backend=self.alias, handle=int(kv.get("lease", 0)) or None,
            ))
        return leases

    def force_release(self, name: str, token: int) -> bool:
        client = self._client()
        base = self._base(name)
        try:
            for kv in self._range(client, base + b"slots/"):
                if int(kv.get("create_revision", 0)) != token:
                    continue
                # Compare the revision: the key may have been released and
                # granted again since the range.
                result = client.transaction({
                    "compare": [{"key": kv["key"], "target": "CREATE", "result": "EQUAL",
                                 "create_revision": token}],
                    "success": [{"request_delete_range": {"key": kv["key"]}}],
                    "failure": [],
                })
                if not result.get("succeeded"):
                    return False
                if kv.get("lease"):
                    # The holder's next keep-alive then reports the loss.
                    self._revoke(EtcdLease(int(kv["lease"]), client=client))
                return True
        except CLIENT_ERRORS as e:
            raise self._error(name, e) from e
        return False
