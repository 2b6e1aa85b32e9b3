"""Lock backend on Redis: every operation is one Lua script, timed by the server.

Each lock name has two keys that share the hash tag ``{name}``, so on Redis
Cluster they would live on one node and one script could touch both (the
client made here is a plain ``redis.Redis``, though):

* ``<prefix>{<name>}:slots`` - a hash ``slot -> lease record``; the record
  holds the fencing token, the grant and expiry times (server milliseconds),
  the TTL and the holder (task id, hostname, pid) so anyone can list holders;
* ``<prefix>{<name>}:token`` - the fencing counter, bumped by ``INCR`` in the
  same script that writes the grant.

Guarantees (beyond :mod:`.base`): a script runs atomically, so reclaiming
expired leases, counting the live ones (every slot, also those above a
capacity that was lowered), picking the lowest free slot and bumping the
token happen as one step. Expiry is decided by ``redis.call('TIME')``, never
by a client's clock, so clients need no clock sync for safety; a lease's
``expires_at`` is the server's time, and ``Lease.is_valid()`` compares it with
the local clock, which is only as good as NTP.

Memory: the slots hash expires by itself one minute after its last lease
would expire, so locks that nobody uses any more vanish. The token counter
never expires (one small string per lock name ever used): if it vanished
while an old holder still runs, a new grant could receive a token lower than
one a fenced storage has already seen. For the same reason the server must
not evict it: use ``maxmemory-policy noeviction`` or a ``volatile-*`` policy
(the counter has no TTL, so ``volatile-*`` policies never pick it).

Limits: Redis replicates asynchronously, so a failover can lose grants made
just before it, and then grant a slot twice; this backend is exactly as safe
as one Redis primary (no Redlock). A restart without persistence (no AOF)
forgets leases and counters alike, so tokens start again at 1: if a fenced
storage must survive that, use ``appendonly yes``.

Error handling
==============

Every ``redis.RedisError`` (connection refused, timeout, a wrong-type key,
a script error) is raised as :class:`~django_celery_adv.exceptions.LockError`
chained with ``from``. The client does not retry by itself: an acquire
whose reply was lost may have been granted, and retrying it would hold a
second slot until its TTL ran out; the caller decides whether to retry.
A lease whose ``acquire`` raised may still be held until its TTL expires.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from ...exceptions import InvalidLockBackendError, LockError
from ...masking import mask_url
from .base import Holder, Lease, LockBackend, from_timestamp

DEFAULT_PREFIX = "celery-adv:lock:"
DEFAULT_SOCKET_TIMEOUT = 5.0
#: How long the slots hash outlives its last lease (ms). Any positive value is
#: safe: the hash's TTL is always past the expiry of every live lease in it.
IDLE_MS = 60_000

# A record is "token:acquired_ms:expires_ms:ttl_ms:" + the holder as JSON. The
# numbers are formatted by the scripts themselves with %d: Lua 5.1 prints large
# numbers in exponent form otherwise, and cjson rounds past 14 digits.
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
  string.format('%d:%d:%d:%d:', token, now, expires, ttl) .. ARGV[3])
if expires > last then last = expires end
redis.call('PEXPIRE', KEYS[1], last - now + idle)
return {slot, token, now, expires}
"""

_RENEW = _NOW + """
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then
  return false
end
local token, acquired, expires, holder =
  string.match(record, '^(%d+):(%d+):(%d+):%d+:(.*)$')
-- An expired lease stays lost even if nobody took its slot yet.
if token ~= ARGV[2] or tonumber(expires) <= now then
  return false
end
local ttl = tonumber(ARGV[3])
local new_expires = now + ttl
redis.call('HSET', KEYS[1], ARGV[1],
  string.format('%d:%d:%d:%d:', token, acquired, new_expires, ttl) .. holder)
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

_FORCE_RELEASE = _NOW + """
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local token, expires = string.match(flat[i + 1], '^(%d+):%d+:(%d+):')
  if token == ARGV[1] and tonumber(expires) > now then
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
class _Connection:
    """A client and its scripts, valid only in the process that created them."""

    pid: int
    client: redis.Redis
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

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        if not self.options.get("url"):
            raise InvalidLockBackendError(f"redis lock backend {alias!r} needs OPTIONS['url'].")
        self.url = str(self.options["url"])
        self.prefix = str(self.options.get("prefix", DEFAULT_PREFIX))
        timeout = self.options.get("socket_timeout", DEFAULT_SOCKET_TIMEOUT)
        self.socket_timeout = None if timeout is None else float(timeout)
        self._conn: _Connection | None = None
        self._guard = threading.Lock()
        self._guard_pid = os.getpid()

    # -- the five operations ------------------------------------------------

    def acquire(self, name: str, capacity: int, holder: Holder, ttl: float) -> Lease | None:
        if capacity <= 0:
            return None
        conn = self._connection()
        slots, token_key = self._keys(name)
        reply = self._run(conn.acquire, [slots, token_key],
                          [int(capacity), _ms(ttl), json.dumps(holder.as_dict()), IDLE_MS])
        if reply is None:
            return None
        slot, token, acquired_ms, expires_ms = (int(value) for value in reply)
        return Lease(name=name, slot=slot, token=token, holder=holder,
                     acquired_at=from_timestamp(acquired_ms / 1000),
                     expires_at=from_timestamp(expires_ms / 1000),
                     ttl=ttl, backend=self.alias)

    def renew(self, lease: Lease) -> bool:
        conn = self._connection()
        slots, _ = self._keys(lease.name)
        expires_ms = self._run(conn.renew, [slots],
                               [lease.slot, lease.token, _ms(lease.ttl), IDLE_MS])
        if expires_ms is None:
            return False
        lease.expires_at = from_timestamp(int(expires_ms) / 1000)
        return True

    def release(self, lease: Lease) -> None:
        conn = self._connection()
        slots, _ = self._keys(lease.name)
        self._run(conn.release, [slots], [lease.slot, lease.token])

    def holders(self, name: str) -> list[Lease]:
        conn = self._connection()
        slots, _ = self._keys(name)
        flat = self._run(conn.holders, [slots], [])
        leases = [self._parse(name, int(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]
        return sorted(leases, key=lambda lease: lease.slot)

    def force_release(self, name: str, token: int) -> bool:
        conn = self._connection()
        slots, _ = self._keys(name)
        return bool(self._run(conn.force_release, [slots], [int(token)]))

    def close(self) -> None:
        with self._lock():
            conn, self._conn = self._conn, None
        # Another process's connections are not ours to shut down.
        if conn is not None and conn.pid == os.getpid():
            conn.client.close()

    def describe(self) -> str:
        return f"redis {mask_url(self.url)} prefix {self.prefix!r}"

    # -- helpers ---------------------------------------------------------------

    def _keys(self, name: str) -> tuple[str, str]:
        # Both keys are identical up to the closing brace, so Redis Cluster finds
        # the same hash tag in both whatever braces the prefix or name contain.
        base = f"{self.prefix}{{{name}}}"
        return f"{base}:slots", f"{base}:token"

    def _lock(self) -> threading.Lock:
        # A lock inherited through fork may be held by a thread that does not
        # exist in the child; the child starts with a fresh one.
        if self._guard_pid != os.getpid():
            self._guard = threading.Lock()
            self._guard_pid = os.getpid()
        return self._guard

    def _connection(self) -> _Connection:
        conn = self._conn
        pid = os.getpid()
        if conn is not None and conn.pid == pid:
            return conn
        with self._lock():
            conn = self._conn
            if conn is not None and conn.pid == pid:
                return conn
            # A client inherited through fork shares its sockets with the
            # parent; it is dropped unclosed so the parent's stay usable.
            client = redis.Redis.from_url(
                self.url, socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout,
                retry=Retry(NoBackoff(), 0), decode_responses=True,
            )
            conn = _Connection(
                pid=pid, client=client,
                acquire=client.register_script(_ACQUIRE),
                renew=client.register_script(_RENEW),
                release=client.register_script(_RELEASE),
                force_release=client.register_script(_FORCE_RELEASE),
                holders=client.register_script(_HOLDERS),
            )
            self._conn = conn
            return conn

    def _run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return script(keys=keys, args=args)
        except redis.RedisError as e:
            raise LockError(f"redis lock backend {self.alias!r} "
                            f"({mask_url(self.url)}): {e}") from e

    def _parse(self, name: str, slot: int, record: str) -> Lease:
        token, acquired_ms, expires_ms, ttl_ms, holder = record.split(":", 4)
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
