"""The alarm tables: one row per scheduled message, and the history of its answered attempts."""

from __future__ import annotations

from typing import TypeVar

from django.db import models

from . import states

_M = TypeVar("_M", bound=models.Model)


class PackageManager(models.Manager[_M]):
    """Every query of the package's models on the package's database (``db.alias``): the setting, else
    the routers' alias for writing ``Alarm``."""

    def get_queryset(self) -> models.QuerySet[_M]:
        from . import db

        return super().get_queryset().using(db.alias())


class Alarm(models.Model):
    """A message scheduled for delivery at ``dispatch_at`` by the Scheduller named ``scheduller``.

    Written only through ``celery_scheduller.store``; read it freely.
    """

    message_id = models.CharField(max_length=255)
    scheduller = models.CharField(max_length=255)
    task_name = models.CharField(max_length=255)
    raw_request = models.JSONField(default=dict)
    assigns = models.JSONField(default=dict)
    correlation_id = models.CharField(max_length=255, blank=True, default="")
    causation_id = models.CharField(max_length=255, blank=True, default="")
    aggregate_id = models.CharField(max_length=255)
    dispatch_at = models.DateTimeField(db_index=True)
    state = models.CharField(max_length=16, choices=states.CHOICES, default=states.PENDING)
    #: How many times this alarm has been published; the current attempt's number once published.
    attempt = models.PositiveIntegerField(default=0)
    #: ``dispatch_timeout`` of the message, evaluated when the attempt was stored.
    timeout_ms = models.PositiveIntegerField(default=5_000)
    published_at = models.DateTimeField(null=True, blank=True)
    #: When a response for the published attempt stops being awaited.
    deadline = models.DateTimeField(null=True, blank=True)
    last_response = models.JSONField(null=True, blank=True)
    #: ``service_responded`` failures in a row for the current attempt (raised, returned garbage, overran its
    #: budget): each one decides the attempt's response again after a back-off; at CALLBACK_MAX_FAILURES the
    #: alarm is failed. A ``Retry`` sets it back to 0; an alarm that ends keeps it, as a record.
    callback_failures = models.PositiveIntegerField(default=0, db_default=0)
    #: The alarm was retried after an error or a timeout, or its ``service_responded`` failed and waits to be
    #: called again: the admin's "failing" view. Set by every retry, so it describes the latest answer.
    failing = models.BooleanField(default=False, db_default=False)
    #: When the alarm ended (finished, failed or cancelled); kept rows are pruned after KEEP_FINISHED.
    finished_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = PackageManager()

    class Meta:
        # Declared here rather than with unique=/db_index= on the fields: those add a second, LIKE-pattern
        # index per text column on PostgreSQL, which every insert pays for and no query here uses.
        constraints = [models.UniqueConstraint(fields=["message_id"], name="csched_message_id")]
        indexes = [
            # the admin's exact search and cancel_aggregate
            models.Index(fields=["aggregate_id"], name="csched_aggregate"),
            models.Index(fields=["correlation_id"], name="csched_correlation"),
            # beat's window loads and due claims: pending rows by time
            models.Index(fields=["state", "dispatch_at"], name="csched_state_due"),
            # Beat's timeout scan (only published rows have a deadline) and pruning of kept history (only
            # ended rows have finished_at). Not led by ``state``: under statistics that knew of no pending
            # row, PostgreSQL took such an index for beat's claim of pending rows and sorted every due one.
            models.Index(fields=["deadline", "state"], name="csched_deadline_state"),
            models.Index(fields=["finished_at", "state"], name="csched_finished_state"),
            # the admin's Scheduller filter and the status command's counts
            models.Index(fields=["scheduller", "state", "dispatch_at"], name="csched_owner_state_due"),
            # the admin's "failing" view: the few failing alarms, soonest first
            models.Index(fields=["failing", "state", "dispatch_at"], name="csched_failing"),
        ]

    def __str__(self) -> str:
        return f"{self.message_id} ({self.state}, attempt {self.attempt})"


class AlarmAttempt(models.Model):
    """One answered attempt of an alarm that stays on record (retried, or kept after it ended)."""

    message_id = models.CharField(max_length=255)
    attempt = models.PositiveIntegerField()
    published_at = models.DateTimeField(null=True, blank=True)
    responded_at = models.DateTimeField()
    status = models.CharField(max_length=16)
    error = models.TextField(blank=True, default="")
    decision = models.CharField(max_length=50, blank=True, default="")

    objects = PackageManager()

    class Meta:
        indexes = [models.Index(fields=["message_id", "attempt"], name="csched_attempt_msg")]

    def __str__(self) -> str:
        return f"{self.message_id} attempt {self.attempt}: {self.status}"


class BeatRecord(models.Model):
    """What a running beat last said about itself: its loaded windows and what it published."""

    name = models.CharField(max_length=255, unique=True)
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField(db_index=True)
    #: Scheduller name → ISO time up to which that Scheduller's alarms are loaded.
    windows = models.JSONField(default=dict)
    published = models.PositiveBigIntegerField(default=0)
    timeouts = models.PositiveBigIntegerField(default=0)

    objects = PackageManager()

    def __str__(self) -> str:
        return self.name


class TaskRecord(models.Model):
    """A Django Tasks result (``task_backend.AlarmTaskBackend``): what ``get_result`` reads."""

    id = models.CharField(max_length=64, primary_key=True)
    task_path = models.CharField(max_length=255)
    backend = models.CharField(max_length=100)
    queue_name = models.CharField(max_length=100)
    priority = models.IntegerField(default=0)
    run_after = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=16)
    args = models.JSONField(default=list)
    kwargs = models.JSONField(default=dict)
    return_value = models.JSONField(null=True, blank=True)
    #: ``[{"exception_class_path": …, "traceback": …}]``, one per failed attempt
    errors = models.JSONField(default=list)
    worker_ids = models.JSONField(default=list)
    enqueued_at = models.DateTimeField()
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    last_attempted_at = models.DateTimeField(null=True, blank=True)
    #: When the result stops being readable (finished + the backend's RESULT_TTL); pruned by beat after it
    expires_at = models.DateTimeField(null=True, blank=True, db_index=True)

    objects = PackageManager()

    def __str__(self) -> str:
        return f"{self.task_path} {self.id} ({self.status})"


class ActivityMinute(models.Model):
    """What one process (a beat, a worker's pool process) did in one minute: the admin's dashboard sums these.
    Each process writes its own rows (``activity``); beat removes them after ``activity.KEEP``."""

    minute = models.DateTimeField()
    #: the process: host and pid
    source = models.CharField(max_length=255)
    published = models.PositiveIntegerField(default=0)
    finished = models.PositiveIntegerField(default=0)
    retried = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    cancelled = models.PositiveIntegerField(default=0)
    #: answers that were an error, a timeout, a lost worker or a time limit
    errors = models.PositiveIntegerField(default=0)
    #: tasks started, by start lateness: a count per bucket of ``activity.LATENESS_BOUNDS`` (the last: above)
    lateness = models.JSONField(default=list)

    objects = PackageManager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["minute", "source"], name="csched_activity_minute")]

    def __str__(self) -> str:
        return f"{self.source} {self.minute:%Y-%m-%d %H:%M}"
