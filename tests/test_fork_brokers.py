"""A forked child never touches its parent's broker connections.

After an ``inspect`` gives up early, the Redis channel it used can go back to a
pool still polling: its BRPOP sent, the reply not read. kombu's after-fork
hooks close inherited pools in the child, and closing that channel reads the
reply from the socket the child shares with its parent; when the parent reads
it first, the child waits forever (seen as the multiprocessing races of the
lock tests hanging, now and then, after a test that ran
``inspect(timeout=0.05)``). ``registry`` now leaves the parent's pools alone in
the child, which opens its own. This test checks that mechanism directly: the
hang itself depends on which process reads first.
"""

from __future__ import annotations

import multiprocessing

from kombu import pools as kombu_pools

from django_celery_adv.registry import apps

_parents: list = []


def _open_connections() -> list:
    """The pooled broker connections this process holds open (app and kombu pools)."""
    app = apps["default"]
    pools = [app.pool, *kombu_pools.connections.values()]
    return [connection for pool in pools for connection in list(pool._resource.queue)
            if getattr(connection, "_connection", None) is not None]


def _child(results) -> None:
    untouched = all(connection._connection is not None for connection in _parents[:-1])
    fresh = apps["default"].pool is not _parents[-1]
    with apps["default"].pool.acquire(block=True, timeout=5) as connection:
        connection.ensure_connection(max_retries=1)  # the child's own connection works
    results.put((untouched, fresh))


def test_a_forked_child_leaves_its_parents_broker_connections_alone():
    app = apps["default"]
    for _ in range(2):
        app.control.inspect(timeout=0.05).ping()
    with app.pool.acquire(block=True, timeout=5) as connection:
        connection.ensure_connection(max_retries=1)
    _parents[:] = [*_open_connections(), app.pool]
    assert len(_parents) > 1, "no pooled broker connection to inherit"
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_child, args=(results,))
    child.start()
    child.join(10)
    alive = child.is_alive()
    if alive:
        child.kill()
        child.join()
    assert not alive, "the forked child hung on its parent's broker connection"
    assert child.exitcode == 0
    untouched, fresh = results.get(timeout=1)
    assert untouched, "the child closed connections it inherited from its parent"
    assert fresh
    with app.pool.acquire(block=True, timeout=5) as connection:  # the parent's still work
        connection.ensure_connection(max_retries=1)
