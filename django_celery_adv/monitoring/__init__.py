"""Status of every configured Celery app at once, at fleet scale: workers, tasks, queues.

:func:`inspect_all` reads each app of ``CELERY_ADV["APPS"]`` (``stats`` and
``active_queues``; ``active`` too when asked, :data:`FULL_COMMANDS`) and
returns plain dataclasses that the ``celery_status`` command, the admin
pages and ``/metrics`` render; :func:`read_worker` reads one worker with its
running tasks for its page.

Guarantees (measured at 2,000 simulated workers on Redis, see README):

* **Complete or says so.** Every reply that arrives before the deadline is
  read (:mod:`.collect`: O(1) per reply, batched reads on Redis). A reply
  asked for and not read makes the reading ``partial``, with the count
  (``unread``) and the workers that sent nothing (``missing``). A field the
  worker did not send is ``None``; a field whose reply was not read is
  ``None`` *and* its command is in ``WorkerStatus.unread``.
* **Fast when healthy.** The reading ends as soon as every known worker has
  answered every command, plus ``MONITORING["NEWCOMER_GRACE"]``; only a
  process with no record (first reading ever) waits the whole timeout.
* **Shared.** A reading younger than ``MONITORING["READING_MAX_AGE"]`` is
  reused by every view and process; one process at a time broadcasts to an
  app (:mod:`.shared`).
* **Does not lie about busy workers.** A worker that answered before and is
  silent now keeps its last values with their time (``values_at``), is "no
  reply" for ``OFFLINE_AFTER`` seconds and then "offline", and is dropped
  after ``FORGET_AFTER``; :meth:`AppStatus.problem` tolerates it for
  ``SILENT_WINDOW`` seconds. A heartbeat (``mark_seen``) counts as seen.
* **The record is in the database** (:class:`~django_celery_adv.models.SeenWorker`,
  :class:`~django_celery_adv.models.AppReading`), so every process sees it
  without a shared cache. :func:`last_reading` reads it without a broadcast.
* **Bounded, isolated, no secrets.** Each app in its own thread on its own
  connection (connect/socket timeouts, one attempt; abandoned after
  ``timeout`` + ``HARD_GRACE``); replies on the app's own control exchange;
  broker URLs, errors and task arguments masked (``active(safe=True)``:
  Celery's ``argsrepr``/``kwargsrepr``).
"""

from __future__ import annotations

from .readings import ActiveTask, AppStatus, Status, WorkerStatus
from .shared import (
    COMMANDS,
    FULL_COMMANDS,
    HARD_GRACE,
    app_secrets,
    broker_url,
    forget_workers,
    inspect_all,
    last_reading,
    load_seen,
    mark_seen,
    mark_seen_many,
    read_worker,
    save_seen,
)

__all__ = ["COMMANDS", "FULL_COMMANDS", "HARD_GRACE", "ActiveTask", "AppStatus", "Status",
           "WorkerStatus",
           "app_secrets", "broker_url", "forget_workers", "inspect_all", "last_reading",
           "load_seen", "mark_seen", "mark_seen_many", "read_worker", "save_seen"]
