"""What the test tasks and the test Scheduller saw, written by the worker, read by the tests."""

from django.db import models


class Run(models.Model):
    """One execution of a test task."""

    task = models.CharField(max_length=100)
    message_id = models.CharField(max_length=255, blank=True, default="")
    attempt_assigns = models.JSONField(default=dict)
    kwargs = models.JSONField(default=dict)
    started_at = models.DateTimeField()


class Answer(models.Model):
    """One call of TestAlarms.service_responded and what it decided."""

    message_id = models.CharField(max_length=255)
    status = models.CharField(max_length=16)
    value = models.JSONField(null=True)
    error = models.TextField(null=True)
    assigns = models.JSONField(default=dict)
    decision = models.CharField(max_length=50)
    at = models.DateTimeField(auto_now_add=True)


class Published(models.Model):
    """One publish of an alarm attempt, recorded by beats in the fault suite (alarm_published signal)."""

    message_id = models.CharField(max_length=255)
    attempt = models.PositiveIntegerField()
    beat = models.CharField(max_length=100)
    at = models.DateTimeField(auto_now_add=True)
