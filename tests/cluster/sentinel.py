"""The project's Redis lock backend on a primary found through Sentinel (test side).

``RedisBackend`` takes one URL; for the Redis rows of the suite its client is
built from ``redis.sentinel.Sentinel.master_for`` instead, which asks the
Sentinels (in the order given) for the current primary and reconnects to the
new one after a failover. Scripts, keys and tokens are the backend's own.
"""

from __future__ import annotations

from typing import Any

from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from django_celery_adv.locks.backends import redis as redis_backend


class SentinelRedisBackend(redis_backend.RedisBackend):
    """OPTIONS as ``RedisBackend`` plus ``sentinels``: ``[[host, port], ...]``;
    the monitored primary is named ``cadv`` (``scripts/cluster.sh``)."""

    def _connect(self) -> Any:
        timeout = self.socket_timeout
        sentinel = Sentinel([tuple(pair) for pair in self.options["sentinels"]],
                            socket_timeout=timeout, socket_connect_timeout=timeout)
        client = sentinel.master_for("cadv", socket_timeout=timeout,
                                     socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
                                     decode_responses=True, protocol=2)
        scripts = redis_backend
        return scripts._Client(
            redis=client, acquire=client.register_script(scripts._ACQUIRE),
            renew=client.register_script(scripts._RENEW),
            release=client.register_script(scripts._RELEASE),
            force_release=client.register_script(scripts._DELETE),
            holders=client.register_script(scripts._HOLDERS))

    def describe(self) -> str:
        return f"redis via sentinels {self.options['sentinels']}"
