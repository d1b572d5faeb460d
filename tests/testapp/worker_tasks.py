"""A task only the test worker knows (imported when ``CSCHED_WORKER_TASKS`` is set): one deployed to the
workers while beat, and the process that dispatched, still run the older code."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from .tasks import _record


@shared_task(name="testapp.worker_only")
def worker_only(**kwargs: Any) -> str:
    """Record the run."""
    _record("worker_only", kwargs)
    return "done"
