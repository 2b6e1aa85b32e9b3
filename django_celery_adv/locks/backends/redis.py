"""Lock backend on Redis: every operation is one Lua script, timed by the server.

Each lock name has two keys that share the hash tag ``{name}``, so on Redis
Cluster they would live on one node and one script could touch both (the
client made here is a plain ``redis.Redis``, though):

* ``<prefix>{<name>}:slots`` - a hash ``slot -> lease record``; the record
  holds the fencing token, the grant and expiry times (server milliseconds),
  the TTL, the id of the acquire request that wrote it, and the holder (task
  id, hostname, pid) so anyone can list holders;
* ``<prefix>{<name>}:token`` - the fencing counter, bumped by ``INCR`` in the
  same script that writes the grant.

Guarantees (beyond :mod:`.base`): a script runs atomically, so reclaiming
expired leases, counting the live ones (every slot, also those above a
capacity that was lowered), picking the lowest free slot and bumping the
token happen as one step.

Clocks: who holds a slot is decided by ``redis.call('TIME')`` only, never by a
client's clock, so a client whose clock is minutes off can neither be
granted a held slot nor keep one past its expiry. A lease's ``expires_at``
is the server's time, for display. ``Lease.is_valid()`` is local: the
``time.monotonic()`` reading taken before the grant or renew script was sent,
plus the TTL, so the holder stops counting on the lease no later than the
server expires it (whatever either wall clock says), give or take the
difference in clock *rates* over one TTL.

A reply lost after the server applied the grant: every acquire carries a
random request id, stored in the lease record. If the script call fails by
a connection error or timeout, the grant may have been applied without the
client hearing of it, so the backend at once asks the server, on a fresh
connection (redis-py drops the failed one), to delete the record written by
that request id (as redlock-py releases by its random value), then raises
``LockError`` all the same. That is best effort: if the release cannot get
through either, the slot stays taken until its TTL expires, never longer.
A new connection sends no handshake of its own (RESP2, no ``CLIENT
SETINFO``), so that release is the first thing it sends. A failed acquire
takes at most about twice ``socket_timeout``.

Memory: the slots hash expires by itself one minute after its last lease
would expire, so locks that nobody uses any more vanish. The token counter
never expires (one small string per lock name ever used): if it vanished
while an old holder still runs, a new grant could receive a token lower than
one a fenced storage has already seen. For the same reason the server must
not evict it: use ``maxmemory-policy noeviction`` or a ``volatile-*`` policy
(the counter has no TTL, so ``volatile-*`` policies never pick it).

Limits: fencing tokens restart when the counter is lost. A restart without
persistence (no AOF) forgets leases and counters alike, so tokens start
again at 1 (``test_redis_faults`` proves it), and a failover to a replica
that had not yet received the last ``INCR`` (replication is asynchronous)
can grant a token twice, and a slot twice. This backend is exactly as safe
as one Redis primary (no Redlock). Where a fenced storage must survive that,
use ``appendonly yes`` at least, or better a backend whose tokens survive
restarts and failover (ZooKeeper, etcd, the database).

Error handling
==============

Every ``redis.RedisError`` (connection refused, timeout, a wrong-type key,
a script error) is raised as :class:`~django_celery_adv.exceptions.LockError`
chained with ``from`` (:meth:`~.base.LockBackend.translate_errors`). The
client does not retry by itself: a retried acquire whose first reply was
lost would hold a second slot; instead a failed acquire withdraws its
request (above) and the caller decides whether to try again. ``renew``
raises on a server it cannot reach (the heartbeat retries until the lease's
own expiry) and returns False once the server no longer has the lease
(expired, force-released, or forgotten by a restart).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from ...exceptions import InvalidLockBackendError
from ...masking import mask_text, mask_url
from ...process import PerProcess
from .base import Holder, Lease, LockBackend, from_timestamp

logger = logging.getLogger("django_celery_adv.locks")

DEFAULT_PREFIX = "celery-adv:lock:"
DEFAULT_SOCKET_TIMEOUT = 5.0
#: How long the slots hash outlives its last lease (ms). Any positive value is
#: safe: the hash's TTL is always past the expiry of every live lease in it.
IDLE_MS = 60_000
#: Errors after which an acquire may have been applied unheard (not a script
#: error: the server replied to that one).
_UNANSWERED = (redis.ConnectionError, redis.TimeoutError)

# A record is "token:acquired_ms:expires_ms:ttl_ms:request:" + the holder as
# JSON. The numbers are formatted by the scripts themselves with %d: Lua 5.1
# prints large numbers in exponent form otherwise, and cjson rounds past 14
# digits. The request id is hex, so it never contains the separator.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_ACQUIRE = _NOW + """
local capacity = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local idle = tonumber(ARGV[4])
local taken = {}
local live = 0
local last = 0
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local expires = tonumber(string.match(flat[i + 1], '^%d+:%d+:(%d+):'))
  if expires <= now then
    redis.call('HDEL', KEYS[1], flat[i])
  else
    taken[tonumber(flat[i])] = true
    live = live + 1
    if expires > last then last = expires end
  end
end
-- Count every live slot, also those at or above a capacity that was lowered:
-- their holders keep them, and nobody else gets in until the count drops.
if live >= capacity then
  return false
end
-- live < capacity, so a slot below capacity is free.
local slot = 0
while taken[slot] do slot = slot + 1 end
local token = redis.call('INCR', KEYS[2])
local expires = now + ttl
redis.call('HSET', KEYS[1], slot,
  string.format('%d:%d:%d:%d:', token, now, expires, ttl) .. ARGV[5] .. ':' .. ARGV[3])
if expires > last then last = expires end
redis.call('PEXPIRE', KEYS[1], last - now + idle)
return {slot, token, now, expires}
"""

_RENEW = _NOW + """
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then
  return false
end
local token, acquired, expires, rest =
  string.match(record, '^(%d+):(%d+):(%d+):%d+:(.*)$')
-- An expired lease stays lost even if nobody took its slot yet.
if token ~= ARGV[2] or tonumber(expires) <= now then
  return false
end
local ttl = tonumber(ARGV[3])
local new_expires = now + ttl
redis.call('HSET', KEYS[1], ARGV[1],
  string.format('%d:%d:%d:%d:', token, acquired, new_expires, ttl) .. rest)
if redis.call('PTTL', KEYS[1]) < ttl + tonumber(ARGV[4]) then
  redis.call('PEXPIRE', KEYS[1], ttl + tonumber(ARGV[4]))
end
return new_expires
"""

_RELEASE = """
local record = redis.call('HGET', KEYS[1], ARGV[1])
if record and string.match(record, '^(%d+):') == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

# Deletes the live record of a token (force release, ARGV[1]) or of an acquire
# request (withdrawal of a grant whose reply was lost, ARGV[2]); the other
# argument is "-", which matches no record.
_DELETE = _NOW + """
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local token, expires, request = string.match(flat[i + 1], '^(%d+):%d+:(%d+):%d+:(%x+):')
  if (token == ARGV[1] or request == ARGV[2]) and tonumber(expires) > now then
    return redis.call('HDEL', KEYS[1], flat[i])
  end
end
return 0
"""

# A script rather than HGETALL so that "live" is judged by the server's clock.
_HOLDERS = _NOW + """
local flat = redis.call('HGETALL', KEYS[1])
local live = {}
for i = 1, #flat, 2 do
  if tonumber(string.match(flat[i + 1], '^%d+:%d+:(%d+):')) > now then
    table.insert(live, flat[i])
    table.insert(live, flat[i + 1])
  end
end
return live
"""


@dataclass(frozen=True)
class _Client:
    """One process's client and the scripts registered on it."""

    redis: redis.Redis
    acquire: Script
    renew: Script
    release: Script
    force_release: Script
    holders: Script


class RedisBackend(LockBackend):
    """Leases are fields of a hash per lock name; scripts keep them consistent.

    OPTIONS: ``url`` (required, e.g. ``redis://:password@host:6379/0``),
    ``prefix`` (default ``"celery-adv:lock:"``), ``socket_timeout`` (seconds,
    default 5, also the connect timeout: an acquire must never hang).
    """

    required_options = ("url",)
    client_errors = (redis.RedisError,)

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        if not self.options.get("url"):
            raise InvalidLockBackendError(f"redis lock backend {alias!r} needs OPTIONS['url'].")
        self.url = str(self.options["url"])
        self.prefix = str(self.options.get("prefix", DEFAULT_PREFIX))
        timeout = self.options.get("socket_timeout", DEFAULT_SOCKET_TIMEOUT)
        self.socket_timeout = None if timeout is None else float(timeout)
        self._client: PerProcess[_Client] = PerProcess(
            self._connect, close=lambda client: client.redis.close())

    # -- the five operations ------------------------------------------------

    def acquire(self, name: str, capacity: int, holder: Holder, ttl: float) -> Lease | None:
        if capacity <= 0:
            return None
        slots, token_key = self._keys(name)
        request = secrets.token_hex(16)
        with self.translate_errors(name):
            client = self._client.get()
            sent_at = time.monotonic()
            try:
                reply = client.acquire(keys=[slots, token_key], args=[
                    int(capacity), _ms(ttl), json.dumps(holder.as_dict()), IDLE_MS, request])
            except _UNANSWERED:
                self._withdraw(client, name, request)
                raise
        if reply is None:
            return None
        slot, token, acquired_ms, expires_ms = (int(value) for value in reply)
        lease = Lease(name=name, slot=slot, token=token, holder=holder,
                      acquired_at=from_timestamp(acquired_ms / 1000),
                      expires_at=from_timestamp(expires_ms / 1000),
                      ttl=ttl, backend=self.alias)
        lease.confirm(sent_at, ttl)
        return lease

    def renew(self, lease: Lease) -> bool:
        slots, _ = self._keys(lease.name)
        with self.translate_errors(lease.name):
            client = self._client.get()
            sent_at = time.monotonic()
            expires_ms = client.renew(keys=[slots],
                                      args=[lease.slot, lease.token, _ms(lease.ttl), IDLE_MS])
        if expires_ms is None:
            return False
        lease.expires_at = from_timestamp(int(expires_ms) / 1000)
        lease.confirm(sent_at, lease.ttl)
        return True

    def release(self, lease: Lease) -> None:
        slots, _ = self._keys(lease.name)
        with self.translate_errors(lease.name):
            self._client.get().release(keys=[slots], args=[lease.slot, lease.token])

    def holders(self, name: str) -> list[Lease]:
        slots, _ = self._keys(name)
        with self.translate_errors(name):
            flat = self._client.get().holders(keys=[slots], args=[])
        leases = [self._parse(name, int(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]
        return sorted(leases, key=lambda lease: lease.slot)

    def force_release(self, name: str, token: int) -> bool:
        slots, _ = self._keys(name)
        with self.translate_errors(name):
            return bool(self._client.get().force_release(keys=[slots], args=[int(token), "-"]))

    def close(self) -> None:
        self._client.close()

    def describe(self) -> str:
        return f"redis {mask_url(self.url)} prefix {self.prefix!r}"

    # -- helpers ---------------------------------------------------------------

    def _keys(self, name: str) -> tuple[str, str]:
        # Both keys are identical up to the closing brace, so Redis Cluster finds
        # the same hash tag in both whatever braces the prefix or name contain.
        base = f"{self.prefix}{{{name}}}"
        return f"{base}:slots", f"{base}:token"

    def _connect(self) -> _Client:
        client = redis.Redis.from_url(
            self.url, socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.socket_timeout,
            retry=Retry(NoBackoff(), 0), decode_responses=True,
            # No handshake round trips on connect (HELLO, CLIENT SETINFO): the
            # first request on a fresh connection is the caller's own, which is
            # what lets the withdrawal after a lost reply go out at once.
            protocol=2, driver_info=None,
        )
        return _Client(
            redis=client,
            acquire=client.register_script(_ACQUIRE),
            renew=client.register_script(_RENEW),
            release=client.register_script(_RELEASE),
            force_release=client.register_script(_DELETE),
            holders=client.register_script(_HOLDERS),
        )

    def _withdraw(self, client: _Client, name: str, request: str) -> None:
        """Delete the grant of an acquire whose reply was lost, if it was applied."""
        slots, _ = self._keys(name)
        try:
            # EVAL with the body, not EVALSHA: this rarely used script may not
            # be in the server's cache, and a NOSCRIPT reply would be lost too.
            client.redis.eval(_DELETE, 1, slots, "-", request)
        except redis.RedisError as e:
            # The acquire raises anyway; the slot, if granted, ends with its TTL.
            logger.warning("lock %r: no answer to the withdrawal of an acquire whose reply "
                           "was lost (%s: %s); if the grant was applied and the withdrawal "
                           "was not, the slot stays taken until its TTL expires",
                           name, type(e).__name__, mask_text(str(e)))

    def _parse(self, name: str, slot: int, record: str) -> Lease:
        token, acquired_ms, expires_ms, ttl_ms, _request, holder = record.split(":", 5)
        return Lease(
            name=name, slot=slot, token=int(token),
            holder=Holder.from_dict(json.loads(holder)),
            acquired_at=from_timestamp(int(acquired_ms) / 1000),
            expires_at=from_timestamp(int(expires_ms) / 1000),
            ttl=int(ttl_ms) / 1000, backend=self.alias,
        )


def _ms(seconds: float) -> int:
    # At least 1 ms: a zero TTL would grant a lease that is expired at birth.
    return max(1, round(float(seconds) * 1000))
