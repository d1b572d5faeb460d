from django.apps import AppConfig


class TestAppConfig(AppConfig):
    name = "tests.testapp"
    label = "testapp"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        import os

        if os.environ.get("CSCHED_RECORD_PUBLISHES"):
            from celery_scheduller import signals

            from .models import Published

            def record(sender: str, message: object, attempt: int, **kwargs: object) -> None:
                Published.objects.create(message_id=message.id, attempt=attempt, beat=str(os.getpid()))  # type: ignore[attr-defined]

            signals.alarm_published.connect(record, weak=False, dispatch_uid="testapp.record_publish")
