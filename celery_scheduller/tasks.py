"""The package's own Celery task, found by a project's ``app.autodiscover_tasks()``: it runs Django Tasks
enqueued through ``task_backend.AlarmTaskBackend``."""

from __future__ import annotations

from typing import Any

from celery import shared_task


@shared_task(name="celery_scheduller.run_django_task", bind=True, ignore_result=True)
def run_django_task(self: Any, result_id: str) -> dict[str, Any]:
    """Run the Django Task whose result is ``result_id`` and record its outcome."""
    from .task_backend import run

    return run(result_id, worker_id=getattr(self.request, "hostname", None))
