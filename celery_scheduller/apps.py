"""The Django app: connects the worker-side result hook once Django is ready."""

from __future__ import annotations

from django.apps import AppConfig


class CelerySchedullerConfig(AppConfig):
    """App config of celery_scheduller."""

    name = "celery_scheduller"
    verbose_name = "Scheduled alarms"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks, hooks, registry

        if registry.serves_django_tasks():
            from . import task_backend

            task_backend.connect()  # before the hooks: see ``task_backend.connect``
        hooks.connect()
        _ = checks  # importing registers the system checks
