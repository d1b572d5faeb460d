"""Retention that keeps pace: ended alarms (with their history) and expired Django Tasks results go at least
as fast as they end, in short batches; a pruner that falls behind says so. Time is driven by the test."""

from __future__ import annotations

import datetime as dt
import logging
import time

import pytest
from django.db import connection
from django.test import override_settings

from celery_scheduller import Message, Response, pruning, registry, states, status, store
from celery_scheduller.engine import AlarmEngine
from celery_scheduller.models import Alarm, AlarmAttempt
from tests.conftest import wait_for
from tests.testapp.alarms import TestAlarms

pytestmark = pytest.mark.django_db(transaction=True)

START = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)


def end_alarms(alarms: TestAlarms, second: int, count: int) -> None:
    """``count`` alarms due at ``START + second`` are dispatched, claimed and answered OK at that second."""
    now = START + dt.timedelta(seconds=second)
    alarms.dispatch_many(
        ((Message.new("testapp.record", id=f"s{second}-{i}"), f"agg-{i}", now) for i in range(count)), now=now
    )
    for row in store.claim_due(["tests"], now, count):
        assert store.finish(store.AttemptRef.of_row(row), Response("ok", value=1), now, True)


@override_settings(
    CELERY_SCHEDULLER_KEEP_FINISHED=60, CELERY_SCHEDULLER_PRUNE_BATCH=25, CELERY_SCHEDULLER_PRUNE_INTERVAL=30_000
)
def test_kept_history_levels_off_near_rate_times_keep_finished_when_alarms_end_faster_than_one_batch_per_interval():
    """10 alarms end every second for 6 simulated minutes: 24 times what one batch of 25 per 30 s interval
    (the old pruning) removes. Beat's engine asks for a pass every PRUNE_INTERVAL (its own cadence, on the
    test's clock); the rows kept level off between rate × KEEP_FINISHED and rate × (KEEP_FINISHED +
    PRUNE_INTERVAL), and the history goes with its alarms."""
    from tests.celery_app import app

    alarms = TestAlarms()
    rate = 10
    engine = AlarmEngine(
        app,
        names=lambda: ["tests"],
        pruner=pruning.Pruner(store.default, registry.serves_django_tasks, background=False),
    )
    kept: dict[int, int] = {}
    for second in range(0, 361):
        end_alarms(alarms, second, rate)
        now = (START + dt.timedelta(seconds=second)).timestamp()
        if now >= engine.next_prune_at:
            engine._prune(now)
        if second % 60 == 0:
            kept[second] = Alarm.objects.filter(state=states.FINISHED).count()
    assert Alarm.objects.filter(state=states.FINISHED).count() <= rate * (60 + 30) + rate
    for minute in (120, 180, 240, 300, 360):
        assert rate * 60 <= kept[minute] <= rate * (60 + 30) + rate, kept
    # level: the last four samples differ by at most what ends within one PRUNE_INTERVAL
    assert max(kept[m] for m in (180, 240, 300, 360)) - min(kept[m] for m in (180, 240, 300, 360)) <= rate * 30
    # every kept alarm has its one history row, and no history row outlives its alarm
    assert AlarmAttempt.objects.count() == Alarm.objects.count()
    assert engine.pruner.total_alarms == 361 * rate - Alarm.objects.count()
    assert engine.pruner.last is not None and engine.pruner.last.caught_up


@override_settings(CELERY_SCHEDULLER_KEEP_FINISHED=60, CELERY_SCHEDULLER_PRUNE_BATCH=10)
def test_a_pass_that_cannot_catch_up_within_its_time_says_how_far_behind_it_is(caplog):
    alarms = TestAlarms()
    for second in range(0, 5):
        end_alarms(alarms, second, 12)
    now = START + dt.timedelta(seconds=600)
    # status: 60 ended more than KEEP_FINISHED ago, the oldest 540 s past it
    kept = status.retention(now)
    assert kept["waiting"] == 60 and kept["oldest_past_seconds"] == 540.0 and kept["behind"] is True
    pruner = pruning.Pruner(store.default, lambda: False, background=False)
    with caplog.at_level(logging.WARNING, logger="celery_scheduller"):
        report = pruner.run_pass(now.timestamp(), time_limit=0)  # one statement, then out of time
    assert (report.alarms, report.batches, report.caught_up) == (10, 1, False)
    assert report.behind_rows == 50 and report.behind_seconds == 540.0
    [warning] = [r for r in caplog.records if getattr(r, "action", "") == "prune_behind"]
    assert "50 ended alarms older than KEEP_FINISHED remain, the oldest 540 s past it" in warning.getMessage()
    report = pruner.run_pass(now.timestamp())
    assert (report.alarms, report.caught_up, report.batches) == (50, True, 6)
    assert status.retention(now) == {
        "keep_finished_seconds": 60.0,
        "waiting": 0,
        "oldest_past_seconds": None,
        "behind": False,
    }


@override_settings(CELERY_SCHEDULLER_KEEP_FINISHED=60, CELERY_SCHEDULLER_PRUNE_BATCH=7)
def test_beat_prunes_in_a_thread_of_its_own_on_a_database_that_takes_writes_side_by_side(beat):
    if connection.vendor == "sqlite":
        pytest.skip("SQLite takes one writer at a time: beat prunes inside its tick")
    alarms = TestAlarms()
    for second in range(0, 3):
        end_alarms(alarms, second, 10)
    scheduler = beat()
    engine = scheduler.alarm_engine
    assert engine.pruner.background()
    started = time.monotonic()
    engine._prune((START + dt.timedelta(seconds=600)).timestamp())
    assert time.monotonic() - started < 0.5  # the tick does not wait for the 5 statements
    wait_for(lambda: not Alarm.objects.exists(), 10, "the pruning thread to remove 30 alarms")
    assert not AlarmAttempt.objects.exists()
    wait_for(lambda: engine.pruner.last is not None, 5, "the pass's report")
    assert engine.pruner.total_alarms == 30 and engine.pruner.last.batches == 5
    scheduler.close()
    assert engine.pruner._thread is not None and not engine.pruner._thread.is_alive()
