"""Tables of the library: lock definitions, the database lock backend's leases and
fencing counters, the monitoring permission, and task-failure groups."""

from __future__ import annotations

import re

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import IntegrityError, models
from django.utils.deconstruct import deconstructible
from django.utils.translation import gettext_lazy as _

#: Safe as a Redis key part, a ZooKeeper node, an etcd key and a MongoDB value.
LOCK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def validate_lock_name(name: str) -> None:
    if not LOCK_NAME_RE.match(name) or name in (".", ".."):
        raise ValidationError(
            _("%(name)r is not a valid lock name: use 1-200 letters, digits, '.', '_' or '-', "
              "starting with a letter or digit."), params={"name": name})


class LockFence(models.Model):
    """Last fencing token granted per lock name (database backend).

    Created or bumped by one upsert statement at the start of the acquire
    transaction; the row lock it takes serializes the acquirers of one name
    until commit, which is what keeps the holder count within capacity.
    """

    name = models.CharField(max_length=200, primary_key=True)
    last_token = models.BigIntegerField(default=0)

    class Meta:
        verbose_name = _("lock fencing counter")

    def __str__(self) -> str:
        return f"{self.name}: {self.last_token}"


class LockLease(models.Model):
    """One held slot of a lock (database backend); the row is the lease."""

    name = models.CharField(max_length=200, db_index=True)
    slot = models.PositiveIntegerField()
    token = models.BigIntegerField()
    task_id = models.CharField(max_length=255, blank=True)
    hostname = models.CharField(max_length=255, blank=True)
    pid = models.PositiveIntegerField(default=0)
    acquired_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        verbose_name = _("lock lease")
        constraints = [
            models.UniqueConstraint(fields=["name", "slot"], name="dca_lease_unique_slot"),
        ]

    def __str__(self) -> str:
        return f"{self.name}[{self.slot}] #{self.token}"


#: ``CELERY_ADV["LOCK_DEFAULTS"]`` key -> the LockDefinition field it gives the default of.
LOCK_DEFAULT_FIELDS = {"TTL": "ttl", "RETRY_COUNTDOWN": "retry_countdown",
                       "RETRY_JITTER": "retry_jitter", "RETRY_BACKOFF": "retry_backoff",
                       "WAIT": "wait", "MAX_RETRIES": "max_retries"}


@deconstructible(path="django_celery_adv.models.LockDefault")
class LockDefault:
    """A field default read from the merged ``LOCK_DEFAULTS`` setting when a row is made.

    So the admin add form and ``objects.create()`` start from the project's
    settings (``override_settings`` included), not from a number frozen in the
    model. Deconstructible: migrations store ``LockDefault('TTL')``, not a value.
    """

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self) -> object:
        from . import conf

        library = conf.DEFAULTS["LOCK_DEFAULTS"]
        merged = conf.get("LOCK_DEFAULTS")
        # A malformed setting (the checks report it, E013) leaves the library's value.
        return merged.get(self.key, library[self.key]) if isinstance(merged, dict) \
            else library[self.key]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LockDefault) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)


def lock_backend_choices() -> list[tuple[str, str]]:
    from . import conf

    return [(alias, alias) for alias in conf.lock_backend_settings()]


class LockDefinition(models.Model):
    """A lock the code uses, as operators tune it in the admin: the row wins.

    A name used in code with no row gets one created with the code's defaults,
    so the admin lists every lock in use. A new row (admin add form,
    ``objects.create()``) starts from ``CELERY_ADV["LOCK_DEFAULTS"]``
    (:class:`LockDefault`). Running workers pick up edits within
    ``definitions.CHECK_SECONDS`` without a restart (see ``LockDefinitionChange``).
    """

    class OnBusy(models.TextChoices):
        RETRY = "retry", _("retry later")
        DROP = "drop", _("drop the call")

    name = models.CharField(
        max_length=200, unique=True, validators=[validate_lock_name],
        help_text=_("Letters, digits and . _ - only; the same key on every backend."))
    backend = models.CharField(max_length=100, default="default")
    capacity = models.PositiveIntegerField(
        default=1,
        help_text=_("How many may hold it at once; 0 pauses it (nothing new granted)."))
    ttl = models.FloatField(
        _("lease TTL (s)"), default=LockDefault("TTL"), validators=[MinValueValidator(1)],
        help_text=_("A holder that stops renewing loses its slot after this many seconds."))
    retry_countdown = models.FloatField(_("retry countdown (s)"),
                                        default=LockDefault("RETRY_COUNTDOWN"),
                                        validators=[MinValueValidator(0)])
    retry_jitter = models.FloatField(_("retry jitter (s)"), default=LockDefault("RETRY_JITTER"),
                                     validators=[MinValueValidator(0)])
    retry_backoff = models.BooleanField(
        default=LockDefault("RETRY_BACKOFF"),
        help_text=_("Double the countdown with each retry (capped at 10x)."))
    wait = models.FloatField(
        _("wait in the worker (s)"), default=LockDefault("WAIT"),
        validators=[MinValueValidator(0)],
        help_text=_("How long a busy task polls for a slot before going back to the queue."))
    max_retries = models.PositiveIntegerField(
        blank=True, null=True, default=LockDefault("MAX_RETRIES"),
        help_text=_("Lock retries before LockUnavailable; empty = forever."))
    on_busy = models.CharField(max_length=10, choices=OnBusy.choices, default=OnBusy.RETRY)
    beat_on_busy = models.CharField(
        _("at beat, when busy"), max_length=10, blank=True, default="",
        choices=[("", _("as the app's beat setting (BEAT ON_BUSY)")),
                 ("skip", _("skip the run")), ("send", _("send it anyway"))],
        help_text=_("A periodic task using this lock is due while the lock is full: skip "
                    "that run (logged with the holders) or send it anyway (then on_busy "
                    "decides in the worker). Empty: CELERY_ADV['BEAT']['ON_BUSY'] of the "
                    "app, default skip."))
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        permissions = [("force_release_lock", "Can force-release a lock's holders")]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from . import conf

        if self.backend not in conf.lock_backend_settings():
            raise ValidationError({"backend": _("Unknown lock backend %(backend)s.")
                                   % {"backend": repr(self.backend)}})


class LockDefinitionChange(models.Model):
    """One row whose ``version`` grows whenever a ``LockDefinition`` is saved or
    deleted, so long-running processes re-read lock policies only on change."""

    ident = models.PositiveSmallIntegerField(primary_key=True, default=1)
    version = models.BigIntegerField(default=0)

    class Meta:
        verbose_name = _("lock definition change tracker")

    def __str__(self) -> str:
        return f"lock definitions, version {self.version}"

    @classmethod
    def current_version(cls) -> int:
        return cls.objects.filter(ident=1).values_list("version", flat=True).first() or 0

    @classmethod
    def bump(cls) -> None:
        if not cls.objects.filter(ident=1).update(version=models.F("version") + 1):
            try:
                cls.objects.get_or_create(ident=1, defaults={"version": 1})
            except IntegrityError:  # created meanwhile by another process
                cls.objects.filter(ident=1).update(version=models.F("version") + 1)


class Monitoring(models.Model):
    """No table: carries the permission that guards the monitoring pages."""

    class Meta:
        managed = False
        default_permissions = ()
        permissions = [
            ("view_monitoring", "Can view the Celery monitoring pages"),
            # Operator actions (admin/queues.py, admin/worker_control.py), one each.
            ("purge_queue", "Can purge a Celery queue"),
            ("resize_worker_pool", "Can grow or shrink a worker's pool"),
            ("autoscale_worker", "Can set a worker's autoscale bounds"),
            ("manage_worker_consumers", "Can add or cancel a worker's queue consumers"),
            ("set_task_rate_limit", "Can set a task's rate limit on a worker"),
            ("set_task_time_limit", "Can set a task's time limits on a worker"),
            ("shutdown_worker", "Can shut down a worker"),
        ]
        verbose_name = _("Celery monitoring")
        verbose_name_plural = _("Celery monitoring")

    def __str__(self) -> str:
        return "Celery monitoring"


class TaskFailure(models.Model):
    """One group of task failures: the same bug, however often and with whatever arguments.

    Grouped by ``fingerprint`` (task name + exception class + innermost frame
    of project code, see :mod:`django_celery_adv.failures`). The ``last_*``
    fields describe the newest occurrence; ``count`` counts them all, also
    those whose per-day rows were pruned. A resolved group reopens on its next
    occurrence.
    """

    fingerprint = models.CharField(max_length=64, unique=True)
    task_name = models.CharField(max_length=255, db_index=True)
    exception_type = models.CharField(_("exception"), max_length=255, db_index=True)
    location = models.CharField(
        max_length=500, blank=True,
        help_text=_("Innermost frame of project code: file:function."))
    app_alias = models.CharField(_("app"), max_length=100, blank=True, db_index=True)
    count = models.PositiveBigIntegerField(default=0)
    first_seen = models.DateTimeField()
    last_seen = models.DateTimeField(db_index=True)
    last_message = models.TextField(blank=True)
    last_traceback = models.TextField(blank=True)
    last_task_id = models.CharField(max_length=255, blank=True)
    last_args = models.TextField(blank=True)
    last_kwargs = models.TextField(blank=True)
    last_hostname = models.CharField(_("worker"), max_length=255, blank=True)
    resolved = models.BooleanField(default=False, db_index=True)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-last_seen"]
        verbose_name = _("task failure")

    def __str__(self) -> str:
        return f"{self.task_name}: {self.exception_type.rpartition('.')[2]}"


class TaskFailureDay(models.Model):
    """How often one failure group occurred on one day: the history behind the chart."""

    failure = models.ForeignKey(TaskFailure, on_delete=models.CASCADE, related_name="days")
    day = models.DateField(db_index=True)
    count = models.PositiveIntegerField(default=0)

    class Meta:
        verbose_name = _("task failures per day")
        verbose_name_plural = _("task failures per day")
        constraints = [
            models.UniqueConstraint(fields=["failure", "day"], name="dca_failure_day_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.failure_id} {self.day}: {self.count}"


class BeatNode(models.Model):
    """One running beat process as it last reported itself (see ``beat/health.py``).

    Each beat of an app writes its row about once a second, leader or standby,
    so every process (admin, ``celery_status``) sees who leads. A row whose
    ``last_tick`` is old belongs to a beat that died or hangs.
    """

    class Role(models.TextChoices):
        LEADER = "leader", _("leader")
        STANDBY = "standby", _("standby")

    app_alias = models.CharField(_("app"), max_length=100, db_index=True)
    hostname = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.STANDBY)
    token = models.BigIntegerField(_("fencing token"), null=True, blank=True)
    leader_since = models.DateTimeField(null=True, blank=True)
    lock_backend = models.CharField(max_length=100, blank=True)
    max_interval = models.FloatField(_("max interval (s)"), default=0)
    started_at = models.DateTimeField()
    last_tick = models.DateTimeField(db_index=True)
    tick_lag = models.FloatField(_("tick lag (s)"), default=0)
    next_due_name = models.CharField(_("next due entry"), max_length=200, blank=True)
    next_due_at = models.DateTimeField(null=True, blank=True)
    sent = models.PositiveBigIntegerField(_("tasks sent"), default=0)

    class Meta:
        verbose_name = _("beat process")
        verbose_name_plural = _("beat processes")
        ordering = ["app_alias", "-last_tick"]
        constraints = [
            models.UniqueConstraint(fields=["app_alias", "hostname", "pid"],
                                    name="dca_beat_node_unique"),
        ]

    def __str__(self) -> str:
        return _("beat %(app)s %(host)s pid %(pid)s (%(role)s)") % {
            "app": self.app_alias, "host": self.hostname, "pid": self.pid,
            "role": self.get_role_display()}


class PeriodicTaskApp(models.Model):
    """The app whose beat sends a periodic task, as chosen in the periodic task admin.

    Keyed by the periodic task's name (django-celery-beat's unique key), not by a
    foreign key, so this app migrates without django_celery_beat installed. The
    choice applies to tasks that routing leaves to the default app: a task bound
    to an app, or matched by ``TASK_APPS``, is always sent by that app's beat
    (see ``beat.scheduler.task_owner``).
    """

    periodic_task = models.CharField(max_length=200, unique=True)
    app_alias = models.CharField(_("app"), max_length=100)

    class Meta:
        verbose_name = _("periodic task app")

    def __str__(self) -> str:
        return f"{self.periodic_task} -> {self.app_alias}"


class TaskRecord(models.Model):
    """One task as the event recorder last knew it (``manage.py celery_events``).

    Written only by :mod:`django_celery_adv.events` in batches (one upsert per
    second at most); keyed by ``(app_alias, task_id)``. ``state`` is Celery's
    state name (``celery.states``); the ``*_at`` times are the workers' event
    times. ``args``, ``kwargs``, ``result``, ``exception`` and ``traceback``
    are masked (:mod:`django_celery_adv.masking`) and shortened;
    ``retryable`` says the stored ``args``/``kwargs`` are the task's
    argument reprs exactly as the worker sent them (nothing masked or cut), so
    "retry" may resend them if they are Python literals. ``runtime`` is the
    worker's own figure (succeeded) or failed - started;
    ``queue_wait`` is started - received. Rows are pruned by age and count per
    app (``CELERY_ADV["EVENTS"]``, ``manage.py prune_tasks``).

    For readers in other processes (``/metrics``): rows are the current state of
    each recorded task; cumulative per-name counters that survive pruning live in
    :class:`TaskRecorderStats`.
    """

    class State(models.TextChoices):
        PENDING = "PENDING", _("pending")
        RECEIVED = "RECEIVED", _("received")
        STARTED = "STARTED", _("started")
        SUCCESS = "SUCCESS", _("succeeded")
        FAILURE = "FAILURE", _("failed")
        RETRY = "RETRY", _("retried")
        REVOKED = "REVOKED", _("revoked")
        REJECTED = "REJECTED", _("rejected")

    app_alias = models.CharField(_("app"), max_length=100)
    task_id = models.CharField(_("task id"), max_length=255)
    name = models.CharField(max_length=255, blank=True, db_index=True)
    state = models.CharField(max_length=20, choices=State.choices)  # index: (state, id)
    worker = models.CharField(max_length=255, blank=True, db_index=True)
    args = models.TextField(blank=True)
    kwargs = models.TextField(blank=True)
    retryable = models.BooleanField(default=False)
    result = models.TextField(blank=True)
    exception = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    received_at = models.DateTimeField(_("received"), null=True, blank=True, db_index=True)
    started_at = models.DateTimeField(_("started"), null=True, blank=True)
    succeeded_at = models.DateTimeField(_("succeeded"), null=True, blank=True)
    failed_at = models.DateTimeField(_("failed"), null=True, blank=True)
    runtime = models.FloatField(_("runtime (s)"), null=True, blank=True, db_index=True)
    queue_wait = models.FloatField(_("queue wait (s)"), null=True, blank=True)
    retries = models.PositiveIntegerField(default=0)
    parent_id = models.CharField(_("parent id"), max_length=255, blank=True, db_index=True)
    root_id = models.CharField(_("root id"), max_length=255, blank=True, db_index=True)
    #: Timestamp of the event that set ``state`` (merge order), seconds since the epoch.
    state_timestamp = models.FloatField(default=0)
    updated_at = models.DateTimeField(_("updated"), db_index=True)

    class Meta:
        verbose_name = _("task")
        ordering = ["-id"]
        default_permissions = ("view", "delete")
        permissions = [
            ("retry_taskrecord", "Can retry a task with the same arguments"),
            ("revoke_taskrecord", "Can revoke a task"),
            ("terminate_taskrecord", "Can terminate a running task"),
        ]
        constraints = [
            # task_id first: the index also serves lookups by id alone (search, links).
            models.UniqueConstraint(fields=["task_id", "app_alias"], name="dca_task_unique"),
        ]
        indexes = [
            models.Index(fields=["app_alias", "id"], name="dca_task_app_id"),
            models.Index(fields=["app_alias", "updated_at"], name="dca_task_app_updated"),
            models.Index(fields=["state", "id"], name="dca_task_state_id"),
        ]

    def __str__(self) -> str:
        return f"{self.name or '?'}[{self.task_id}]"


class TaskRecorderStats(models.Model):
    """The event recorder's counters for one app: one row per app alias.

    Written by the recorder at each batch (``manage.py celery_events``), read by
    any process (``/metrics``, the workers page) with one query. Counters are
    cumulative since the row was created (they survive recorder restarts):

    * ``events_seen``: events received from the broker;
    * ``events_written``: events whose change reached the database;
    * ``events_dropped``: events lost because the database fell behind (the
      pending batch was full) or a write failed for good;
    * ``last_event_at``: time of the newest event received, ``last_write_at``
      of the newest batch committed;
    * ``workers``: hostname -> ``{"processed", "succeeded", "failed",
      "retried", "active", "loadavg", "heartbeat_at", "sw_ident", "sw_ver",
      "freq"}`` (counts from task events; the rest from the newest heartbeat;
      read it with :func:`django_celery_adv.events.worker_counters`);
    * ``task_counts``: task name -> ``{state: count}``, one count per task
      event (``RECEIVED``, ``STARTED``, ``SUCCESS``, ``FAILURE``, ``RETRY``,
      ``REVOKED``, ``REJECTED``); names beyond the first
      ``events.store.MAX_TASK_NAMES`` are counted under ``"(other)"``.
    """

    app_alias = models.CharField("app", max_length=100, unique=True)
    events_seen = models.PositiveBigIntegerField(default=0)
    events_written = models.PositiveBigIntegerField(default=0)
    events_dropped = models.PositiveBigIntegerField(default=0)
    last_event_at = models.DateTimeField(null=True, blank=True)
    last_write_at = models.DateTimeField(null=True, blank=True)
    workers = models.JSONField(default=dict, blank=True)
    task_counts = models.JSONField(default=dict, blank=True)
    recorder = models.CharField(max_length=255, blank=True,
                                help_text="hostname and pid of the recorder that wrote last")

    class Meta:
        verbose_name = "task recorder counters"
        verbose_name_plural = "task recorder counters"

    def __str__(self) -> str:
        return f"recorder {self.app_alias}: {self.events_seen} events"


class SeenWorker(models.Model):
    """The seen-workers record: one row per worker of an app, shared by every process.

    Written by each monitoring reading (``monitoring.inspect_all``: the workers
    that answered, with the values they reported) and by the events recorder
    (``monitoring.mark_seen`` on a heartbeat: ``last_seen`` only). Read by the
    next reading (which workers to wait for), by the pages (a silent worker
    keeps its last values, marked with their age) and by ``/metrics``, which
    must not broadcast: use ``monitoring.last_reading(alias)``, not this table.
    Rows silent for ``MONITORING["FORGET_AFTER"]`` seconds are deleted.
    """

    app_alias = models.CharField("app", max_length=100)
    hostname = models.CharField(max_length=255)
    #: Last sign of life: a reply to a reading, or a heartbeat event.
    last_seen = models.DateTimeField()
    #: When ``values`` were read (the reading's time); null: known from events only.
    values_at = models.DateTimeField(null=True, blank=True)
    #: WorkerStatus fields of that reading (concurrency, queues, active ...), JSON.
    values = models.JSONField(default=dict, blank=True)

    class Meta:
        verbose_name = "seen worker"
        constraints = [models.UniqueConstraint(fields=["app_alias", "hostname"],
                                               name="dca_seenworker_unique")]
        indexes = [models.Index(fields=["app_alias", "last_seen"], name="dca_seenworker_seen")]

    def __str__(self) -> str:
        return f"{self.app_alias}: {self.hostname}"


class AppReading(models.Model):
    """The latest monitoring reading of one app, and who is taking the next one.

    One row per app alias. ``read_at`` and the counts describe the reading
    whose worker values are in :class:`SeenWorker`; ``reader`` /
    ``reader_until`` is a short claim (set by one conditional UPDATE) so that
    one process at a time broadcasts to an app while the others wait for its
    result (``monitoring.shared``).
    """

    app_alias = models.CharField("app", max_length=100, unique=True)
    read_at = models.DateTimeField(null=True, blank=True)
    duration = models.FloatField(default=0.0)
    reachable = models.BooleanField(default=True)
    error = models.TextField(blank=True, default="")
    #: Inspect commands the reading asked, comma-separated.
    commands = models.CharField(max_length=200, blank=True, default="")
    unread = models.PositiveIntegerField(default=0)
    missing = models.PositiveIntegerField(default=0)
    #: worker -> commands whose reply that reading did not read (expected or answering).
    unread_by = models.JSONField(default=dict, blank=True)
    reader = models.CharField(max_length=64, blank=True, default="")
    reader_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "app reading"

    def __str__(self) -> str:
        return f"{self.app_alias} at {self.read_at}"
