"""A project's subclass of the Django Tasks backend, named as the project likes."""

from __future__ import annotations

from celery_scheduller.task_backend import AlarmTaskBackend


class ProjectTaskBackend(AlarmTaskBackend):
    """AlarmTaskBackend as a project might extend it."""
