"""Lock backend on etcd (v3 API through its HTTP gateway, with ``etcd3gw``).

etcd has no semaphore recipe, so this module is one. A lock name owns

* ``<prefix><quoted name>/slots/<i>``: one key per held slot, attached to an
  etcd lease of its own; its value is the holder as JSON (``task_id``,
  ``hostname``, ``pid``, ``ttl``, ``acquired_at``), for display only;
* ``<prefix><quoted name>/guard``: an empty key rewritten by every grant.

Granting
========

A grant reads both in one range, counts *every* slot key (also those above a
capacity that an operator just lowered), and then commits one transaction:
``guard`` unchanged since the read (``mod_revision``) and the slot key absent
(``create_revision == 0``) => put the slot key with the lease, rewrite
``guard``. Two grants that read the same state cannot both commit, so the
count they checked is still true when they write; releases and expiries only
lower it. A grant that loses the race re-reads (the failed transaction returns
the fresh state) and tries again a few times. The fencing token is the
revision of the granting transaction, which is the slot key's
``create_revision``: revisions only grow, also across a restart of etcd.

Expiry is etcd's alone
======================

A slot key lives exactly as long as its etcd lease: etcd deletes it when the
lease expires or is revoked. No client judges another's key by any clock, and
nothing in the value decides anything. Granularity: etcd lease TTLs are whole
seconds with a server minimum (1.5 election timeouts rounded up: 2 s with
etcd's defaults), and expired leases are swept every 500 ms. A lease is asked
for ``ceil(ttl)`` seconds, so a short TTL rounds up: with ``ttl=1`` the slot of
a holder that died stays taken 2 to 2.5 s.

Validity (:meth:`Lease.is_valid`) follows Redlock's rule on the local monotonic
clock: ``ttl`` seconds (as asked, not rounded up) from when the grant request,
or the last keep-alive that etcd answered, was *sent*. etcd started or restarted
the lease's TTL when it received that request, later, so the holder stops
counting on its lease before etcd can let anyone else take the slot, whatever
any host's wall clock says.

``renew`` refuses (False) a lease whose validity has passed, even if etcd still
has it: the holder may already have acted as if it were lost. It revokes the
lease instead, so the slot frees at once. Otherwise it sends a keep-alive (TTL
<= 0: etcd forgot the lease, it is lost) and checks that the slot key is still
the one this grant created (``create_revision`` == token); then the lease is
valid for ``ttl`` from when the keep-alive was sent. ``release`` revokes the
lease, so the key goes with it and a slot granted to anyone else is never
touched (a lease object without a handle is found by its token: the slot key
that token created). etcd3gw's own ``Lock`` is not used: it leaks the lease of a failed
acquire and does not revoke it on release.

The HTTP client lives in a :class:`~django_celery_adv.process.PerProcess`: a
forked child makes its own session and never touches its parent's sockets.

Error handling
==============

Every failure of the HTTP gateway (connection refused, timeout, a 5xx, a
response it cannot parse) becomes :class:`~django_celery_adv.exceptions.LockError`
through :meth:`LockBackend.translate_errors`, chained with ``from``. Requests
time out after ``timeout`` seconds (default 5), so a server that is down or
hung makes ``acquire`` fail instead of block, and makes ``renew`` raise (an
outage is not a loss: the heartbeat tries again while the lease is valid).
A lease granted for an ``acquire`` that then fails or finds no free slot is
revoked before returning. If even the revoke fails (the server is out of
reach), the lease holds no key, or, if the transaction's reply was lost, at most
the one it wrote, which etcd deletes after the TTL. A revoke of a lease that
etcd no longer knows is not an error.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
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
from ...process import PerProcess
from .base import Holder, Lease, LockBackend, from_timestamp, utcnow

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


def lease_seconds(ttl: float) -> int:
    """The TTL asked of etcd: whole seconds, never shorter than ``ttl``."""
    return max(1, math.ceil(ttl))


@dataclass
class _State:
    """One read of a lock name: the guard's revision and the slot keys."""

    guard_revision: int = 0
    live: dict[int, dict[str, Any]] = field(default_factory=dict)


def _lease_not_found(e: Etcd3Exception) -> bool:
    return "lease not found" in str(e.detail_text or "")


class EtcdBackend(LockBackend):
    """Leases are slot keys attached to etcd leases; see the module docstring.

    OPTIONS: ``host`` (default 127.0.0.1), ``port`` (2379), ``prefix``
    (``/celery-adv/locks/``), ``protocol`` (``http``), ``ca_cert``,
    ``cert_key`` + ``cert_cert`` (client certificate), ``timeout`` (seconds
    per request, default 5), ``pool_size`` (HTTP connections kept, default 32).
    """

    # KeyError/ValueError: a reply without the fields the v3 API promises.
    client_errors = (Etcd3Exception, requests.RequestException, KeyError, ValueError)

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        self.host = str(self.options.get("host") or "127.0.0.1")
        self.port = int(self.options.get("port") or 2379)
        self.protocol = str(self.options.get("protocol") or "http")
        self.prefix = str(self.options.get("prefix") or "/celery-adv/locks/")
        self.timeout = float(self.options.get("timeout") or 5.0)
        self._clients: PerProcess[Etcd3Client] = PerProcess(
            self._connect, close=lambda client: client.session.close())

    def _connect(self) -> Etcd3Client:
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
        return Etcd3Client(host=self.host, port=self.port, protocol=self.protocol,
                           timeout=self.timeout, session=session)

    def close(self) -> None:
        self._clients.close()

    def describe(self) -> str:
        return f"etcd {self.protocol}://{self.host}:{self.port} {self.prefix}"

    # -- keys ----------------------------------------------------------------

    def _base(self, name: str) -> bytes:
        # Quoted so that a "/" in a name cannot reach into another name's keys.
        return f"{self.prefix}{quote(name, safe='')}/".encode()

    def _slot_key(self, lease: Lease) -> bytes:
        return self._base(lease.name) + b"slots/" + str(lease.slot).encode()

    @staticmethod
    def _range(client: Etcd3Client, key: bytes, *, prefix: bool = True) -> list[dict[str, Any]]:
        request = {"key": _b64(key)}
        if prefix:
            request["range_end"] = _b64(_prefix_end(key))
        return list(client.post(client.get_url("/kv/range"), json=request).get("kvs", []))

    @staticmethod
    def _decode(kv: dict[str, Any]) -> dict[str, Any]:
        try:
            data = json.loads(b64decode(kv.get("value", "")) or b"{}")
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _state(kvs: list[dict[str, Any]], base: bytes) -> _State:
        state = _State()
        foreign = -1
        for kv in kvs:
            key = b64decode(kv["key"])
            if key == base + b"guard":
                state.guard_revision = int(kv.get("mod_revision", 0))
            elif key.startswith(base + b"slots/"):
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
        client = self._clients.get()
        base = self._base(name)
        etcd_lease: EtcdLease | None = None
        granted: Lease | None = None
        try:
            with self.translate_errors(name):
                state = self._state(self._range(client, base), base)
                for attempt in range(GRANT_ATTEMPTS):
                    if len(state.live) >= capacity:
                        return None
                    if etcd_lease is None:
                        # Read before the request: etcd starts the TTL later.
                        sent_at, acquired_at = time.monotonic(), utcnow()
                        etcd_lease = client.lease(lease_seconds(ttl))
                    slot = min(set(range(capacity)) - set(state.live))
                    lease = Lease(name=name, slot=slot, token=0, holder=holder,
                                  acquired_at=acquired_at,
                                  expires_at=acquired_at + timedelta(seconds=ttl), ttl=ttl,
                                  backend=self.alias, handle=etcd_lease.id)
                    result = self._commit(client, base, state, lease)
                    if result.get("succeeded"):
                        lease.token = int(result["header"]["revision"])
                        lease.confirm(sent_at, ttl)
                        granted = lease
                        return granted
                    # Another grant committed since our read: count again.
                    fresh = result["responses"][0]["response_range"].get("kvs", [])
                    state = self._state(fresh, base)
                    time.sleep(random.uniform(0, 0.002 * (attempt + 1)))
                return None
        finally:
            if granted is None and etcd_lease is not None:
                # Also after a lost reply: the transaction may have put the key.
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

    @staticmethod
    def _value(lease: Lease) -> bytes:
        return json.dumps({**lease.holder.as_dict(), "ttl": lease.ttl,
                           "acquired_at": lease.acquired_at.timestamp()}).encode()

    def _revoke(self, etcd_lease: EtcdLease) -> None:
        # Best effort: etcd deletes the lease's key after its TTL anyway.
        with contextlib.suppress(*self.client_errors):
            etcd_lease.revoke()

    def _lease_id(self, client: Etcd3Client, lease: Lease) -> int | None:
        """The etcd lease of ``lease``: its handle, or for a lease made by hand
        (no handle) the one of the slot key its token created, if still there."""
        if isinstance(lease.handle, int):
            return lease.handle
        kvs = self._range(client, self._slot_key(lease), prefix=False)
        if kvs and int(kvs[0].get("create_revision", 0)) == lease.token:
            return int(kvs[0].get("lease", 0)) or None
        return None

    def release(self, lease: Lease) -> None:
        client = self._clients.get()
        with self.translate_errors(lease.name):
            lease_id = self._lease_id(client, lease)
            if lease_id is None:
                return
            try:
                EtcdLease(lease_id, client=client).revoke()
            except Etcd3Exception as e:
                if not _lease_not_found(e):
                    raise

    def renew(self, lease: Lease) -> bool:
        if lease.lost:
            return False
        client = self._clients.get()
        if lease.remaining() <= 0:
            # Never extended past its validity: give the slot back instead.
            with contextlib.suppress(LockError):  # best effort: etcd expires it anyway
                self.release(lease)
            return False
        sent_at, started = time.monotonic(), utcnow()
        with self.translate_errors(lease.name):
            lease_id = self._lease_id(client, lease)
            if lease_id is None:
                return False
            etcd_lease = EtcdLease(lease_id, client=client)
            # etcd answers a keep-alive of an expired or revoked lease with no TTL.
            if etcd_lease.refresh() <= 0:
                return False
            kvs = self._range(client, self._slot_key(lease), prefix=False)
        if not kvs or int(kvs[0].get("create_revision", 0)) != lease.token:
            # The key was deleted by hand (or by a force release between its
            # delete and its revoke): the slot is no longer ours.
            self._revoke(etcd_lease)
            return False
        lease.confirm(sent_at, lease.ttl)
        lease.expires_at = started + timedelta(seconds=lease.ttl)
        return True

    def holders(self, name: str) -> list[Lease]:
        client = self._clients.get()
        base = self._base(name)
        leases = []
        with self.translate_errors(name):
            state = self._state(self._range(client, base + b"slots/"), base)
            for slot, kv in sorted(state.live.items()):
                lease_id = int(kv.get("lease", 0))
                left = self._seconds_left(client, lease_id) if lease_id else 0
                if lease_id and left < 0:
                    continue  # expired since the range: the key is gone with it
                data = self._decode(kv)
                ttl, acquired = data.get("ttl"), data.get("acquired_at")
                now = utcnow()
                leases.append(Lease(
                    name=name, slot=slot, token=int(kv["create_revision"]),
                    holder=Holder.from_dict(data),
                    acquired_at=from_timestamp(acquired)
                    if isinstance(acquired, int | float) else now,
                    expires_at=now + timedelta(seconds=max(left, 0)),
                    ttl=float(ttl) if isinstance(ttl, int | float) else 0.0,
                    backend=self.alias, handle=lease_id or None,
                ))
        return leases

    @staticmethod
    def _seconds_left(client: Etcd3Client, lease_id: int) -> int:
        """etcd's own count of the whole seconds a lease has left (display
        only); -1 once it forgot the lease. The gateway omits a TTL of 0."""
        info = client.post(client.get_url("/kv/lease/timetolive"), json={"ID": lease_id})
        return int(info.get("TTL", 0))

    def force_release(self, name: str, token: int) -> bool:
        client = self._clients.get()
        base = self._base(name)
        with self.translate_errors(name):
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
        return False
