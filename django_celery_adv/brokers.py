"""Short-lived, bounded connections to an app's broker for one operator action.

Queue counts, purges and worker remote control each open their own
connection here rather than taking one from the app's pool: the pool's
connections retry for a long time, and a page or command must give up fast.

Guarantees:

* **Bounded.** Connect and socket timeouts of ``timeout`` seconds and one
  connection attempt; a broker that is down raises :class:`BrokerError`
  within about ``timeout``, never hangs a request.
* **Masked.** The error text names the exception and passes through
  :func:`~.masking.mask_text` with the app's broker passwords.
* **The app's own options.** The app's ``broker_transport_options``
  (``priority_steps``, ``sep``, ``global_keyprefix`` ...) still apply; only
  the timeouts and retries are overridden.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from celery import Celery
from kombu import Connection

from .exceptions import BrokerError
from .masking import mask_text
from .monitoring import app_secrets

#: ``Transport.driver_type`` of the transports whose counts we can read.
AMQP = "amqp"
REDIS = "redis"


def driver_type(app: Celery) -> str:
    """The kombu driver of the app's broker: ``amqp``, ``redis``, ``filesystem`` ...

    Reads the transport class only; nothing is connected.
    """
    with app.connection_for_write() as connection:
        return str(connection.transport.driver_type)


def masked_error(app: Celery, error: BaseException) -> str:
    """``ExceptionName: message`` (the name alone if no message), passwords masked."""
    text = str(error)
    return mask_text(f"{type(error).__name__}: {text}" if text else type(error).__name__,
                     app_secrets(app))


@contextlib.contextmanager
def bounded_connection(app: Celery, timeout: float) -> Iterator[Connection]:
    """A connected connection to ``app``'s broker, released on exit.

    Raises :class:`BrokerError` (masked, chained) when the broker cannot be
    reached within ``timeout``; errors raised inside the ``with`` block pass
    through unchanged.
    """
    timeout = max(float(timeout), 0.1)
    connection = app.connection_for_write(
        connect_timeout=timeout,
        # socket_*: Redis; read_/write_timeout: py-amqp, whose connect_timeout
        # covers only the handshake (a broker that stalls later would hang us).
        transport_options={"socket_connect_timeout": timeout, "socket_timeout": timeout,
                           "read_timeout": timeout, "write_timeout": timeout,
                           "max_retries": 1, "interval_start": 0, "interval_step": 0})
    try:
        try:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                                         timeout=timeout)
        except Exception as e:  # every client's own error family
            raise BrokerError(masked_error(app, e)) from e
        yield connection
    finally:
        with contextlib.suppress(Exception):  # a broken connection has nothing to close
            connection.release()
