"""django-celery-beat's periodic tasks and the alarms in one beat (``AlarmDatabaseScheduler``)."""

from __future__ import annotations

import sys
import time

import pytest
from django.utils import timezone

from celery_scheduller import ConfigurationError, Message, states
from celery_scheduller.models import Alarm
from tests.testapp.alarms import TestAlarms
from tests.testapp.models import Run

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker, pytest.mark.usefixtures("worker")]


def test_one_beat_runs_periodic_task_rows_and_alarms_and_picks_up_an_edit(tmp_path):
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from celery_scheduller.schedulers import AlarmDatabaseScheduler
    from tests.celery_app import app

    every_second = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    periodic = PeriodicTask.objects.create(name="tick every second", task="testapp.tick", interval=every_second)
    TestAlarms().dispatch(Message.new("testapp.record", id="beside-periodic"), "agg", in_ms=500)
    scheduler = AlarmDatabaseScheduler(app=app, lazy=False)
    try:

        def ticks_until(condition, timeout: float, what: str) -> None:
            deadline = time.monotonic() + timeout
            while not condition():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(min(max(scheduler.tick(), 0.01), 0.1))

        ticks_until(
            lambda: (
                Alarm.objects.filter(message_id="beside-periodic", state=states.FINISHED).exists()
                and Run.objects.filter(task="tick").count() >= 2
            ),
            20,
            "the alarm and two periodic runs",
        )
        # an edit in django-celery-beat's admin: the row is disabled, and beat stops sending it
        periodic.enabled = False
        periodic.save()
        settle = time.monotonic() + 1.5  # a send already under way when the edit landed may still run
        while time.monotonic() < settle:
            time.sleep(min(max(scheduler.tick(), 0.01), 0.1))
        before = Run.objects.filter(task="tick").count()
        quiet = time.monotonic() + 3
        while time.monotonic() < quiet:
            time.sleep(min(max(scheduler.tick(), 0.01), 0.1))
        assert Run.objects.filter(task="tick").count() == before
        # and an alarm dispatched now still goes out
        TestAlarms().dispatch(Message.new("testapp.record", id="after-edit"), "agg", at=timezone.now())
        ticks_until(
            lambda: Alarm.objects.filter(message_id="after-edit", state=states.FINISHED).exists(), 15, "the alarm"
        )
    finally:
        scheduler.close()


def test_without_django_celery_beat_the_scheduler_says_what_to_install(monkeypatch):
    from celery_scheduller import schedulers

    monkeypatch.setattr(schedulers, "_database_scheduler", None)
    monkeypatch.setitem(sys.modules, "django_celery_beat.schedulers", None)  # import raises ImportError
    with pytest.raises(ConfigurationError, match=r"pip install 'celery-scheduller\[beat\]'"):
        schedulers.AlarmDatabaseScheduler  # noqa: B018 - the attribute is built on first use
