"""The alarm table: one row per scheduled message, the current attempt's state on the row."""

from __future__ import annotations

from django.db import models

from . import states


class Alarm(models.Model):
    """A message scheduled for delivery at ``dispatch_at`` by the Scheduller named ``scheduller``.

    Written only through ``celery_scheduller.store``; read it freely.
    """

    message_id = models.CharField(max_length=255, unique=True)
    scheduller = models.CharField(max_length=255)
    task_name = models.CharField(max_length=255)
    raw_request = models.JSONField(default=dict)
    assigns = models.JSONField(default=dict)
    correlation_id = models.CharField(max_length=255, blank=True, default="")
    causation_id = models.CharField(max_length=255, blank=True, default="")
    aggregate_id = models.CharField(max_length=255, db_index=True)
    dispatch_at = models.DateTimeField()
    state = models.CharField(max_length=16, choices=states.CHOICES, default=states.PENDING)
    #: How many times this alarm has been published; the current attempt's number once published.
    attempt = models.PositiveIntegerField(default=0)
    #: ``dispatch_timeout`` of the message, evaluated when the attempt was stored.
    timeout_ms = models.PositiveIntegerField(default=5_000)
    published_at = models.DateTimeField(null=True, blank=True)
    #: When a response for the published attempt stops being awaited.
    deadline = models.DateTimeField(null=True, blank=True)
    last_response = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [
            # beat's window loads and due claims: pending rows by time
            models.Index(fields=["state", "dispatch_at"], name="csched_state_due"),
            # beat's timeout scan: published rows by deadline
            models.Index(fields=["state", "deadline"], name="csched_state_deadline"),
        ]

    def __str__(self) -> str:
        return f"{self.message_id} ({self.state}, attempt {self.attempt})"
