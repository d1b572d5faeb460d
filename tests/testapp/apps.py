from django.apps import AppConfig


class TestAppConfig(AppConfig):
    name = "tests.testapp"
    label = "testapp"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        import os

        from celery_scheduller import signals as alarm_signals

        def record_failed(sender: str, message: object, attempt: int, reason: str, **kwargs: object) -> None:
            """``alarm_failed`` where it is sent (a worker's writer, beat): a row the tests read."""
            from django.utils import timezone

            from .models import Run

            # the alarm's id in kwargs, not in message_id: rows there are runs of the alarm's task
            Run.objects.create(
                task="alarm_failed",
                kwargs={"alarm": getattr(message, "id", None), "sender": sender, "attempt": attempt, "reason": reason},
                started_at=timezone.now(),
            )

        alarm_signals.alarm_failed.connect(record_failed, weak=False, dispatch_uid="testapp.record_failed")

        if os.environ.get("CSCHED_RECORD_PUBLISHES"):
            from celery_scheduller import signals

            from .models import Published

            def record(sender: str, message: object, attempt: int, **kwargs: object) -> None:
                Published.objects.create(message_id=message.id, attempt=attempt, beat=str(os.getpid()))  # type: ignore[attr-defined]

            signals.alarm_published.connect(record, weak=False, dispatch_uid="testapp.record_publish")
