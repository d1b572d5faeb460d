"""Misuse and hostile conditions: each a clear error or a logged, recoverable alarm; never a lost one."""

from __future__ import annotations

import datetime as dt
import os
import time

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.db.backends.signals import connection_created
from django.test import override_settings
from django.utils import timezone

from celery_scheduller import InvalidAlarm, Message, states, status, store
from celery_scheduller.clock import DatabaseClock
from celery_scheduller.models import Alarm
from celery_scheduller.scheduller import LATEST_DUE
from tests.conftest import run_beat, start_worker, stop, wait_for, worker_idle
from tests.testapp.alarms import TestAlarms
from tests.testapp.models import Answer, Run

pytestmark = pytest.mark.django_db(transaction=True)
server_database_only = pytest.mark.skipif(
    settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"), reason="SQLite shares this host's clock"
)


def test_non_utc_times_are_stored_as_the_same_instant():
    at = dt.datetime(2031, 1, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))
    saved = TestAlarms().dispatch(Message.new("testapp.record", id="ist"), "agg", at=at)
    row = Alarm.objects.get(message_id="ist")
    assert row.dispatch_at == at and saved.dispatch_at.utcoffset() == dt.timedelta(0)
    assert row.assigns["dispatch_at"] == {"$datetime": "2031-01-01T06:30:00+00:00"}


def test_far_future_alarm_waits_and_far_past_alarm_goes_out_at_once_flagged_late(beat):
    alarms = TestAlarms()
    alarms.dispatch(Message.new("testapp.record", id="year-9999"), "agg", at=LATEST_DUE)  # 9998-12-31
    alarms.dispatch(Message.new("testapp.record", id="year-1971"), "agg", at=dt.datetime(1971, 1, 1, tzinfo=dt.UTC))
    scheduler = beat()
    scheduler.tick_alarms(time.time())
    assert "year-9999" not in scheduler.alarm_engine.heap
    assert Alarm.objects.get(message_id="year-9999").state == states.PENDING
    published = Alarm.objects.get(message_id="year-1971")
    assert published.attempt == 1 and published.state in (states.PUBLISHED, states.FINISHED)  # a worker may be quick
    assert published.assigns["late"] is True


def test_oversize_message_is_refused_at_dispatch():
    big = {"blob": "x" * (300 * 1024)}
    with pytest.raises(InvalidAlarm, match=r"more than CELERY_SCHEDULLER_MAX_PAYLOAD \(262144\)"):
        TestAlarms().dispatch(Message.new("testapp.record", big, id="big"), "agg", in_ms=0)
    with override_settings(CELERY_SCHEDULLER_MAX_PAYLOAD=100), pytest.raises(InvalidAlarm, match="MAX_PAYLOAD"):
        TestAlarms().dispatch(Message.new("testapp.record", {"n": "y" * 100}, id="small"), "agg", in_ms=0)
    assert not Alarm.objects.exists()


def test_alarms_of_a_scheduller_no_longer_configured_stay_pending_and_show_in_status(beat):
    alarms = TestAlarms()
    alarms.dispatch(Message.new("testapp.record", id="orphaned"), "agg", in_ms=0)
    Alarm.objects.filter(message_id="orphaned").update(scheduller="removed.OldAlarms")
    beat().tick_alarms(time.time())
    assert Alarm.objects.get(message_id="orphaned").state == states.PENDING  # not lost, not delivered blindly
    report = status.collect(timezone.now())
    assert report["schedullers"]["removed.OldAlarms"]["served"] is False
    assert report["schedullers"]["removed.OldAlarms"]["counts"]["pending"] == 1


def test_published_row_edited_to_lose_its_deadline_is_still_answered(beat):
    alarms = TestAlarms()
    alarms.dispatch(Message.new("testapp.record", id="no-deadline"), "agg", in_ms=0)
    store.claim_due(["tests"], timezone.now(), 10)
    Alarm.objects.filter(message_id="no-deadline").update(deadline=None)  # by hand, in a SQL shell
    finished = lambda: Alarm.objects.filter(message_id="no-deadline", state=states.FINISHED).exists()  # noqa: E731
    run_beat(beat(), finished, 10, "the timeout answered")
    answer = Answer.objects.get(message_id="no-deadline")
    assert answer.status == "timeout" and answer.decision == "ok"


def test_row_edited_into_an_unknown_state_is_kept_and_reported(beat):
    TestAlarms().dispatch(Message.new("testapp.record", id="bogus"), "agg", in_ms=0)
    Alarm.objects.filter(message_id="bogus").update(state="running?")
    beat().tick_alarms(time.time())
    assert Alarm.objects.get(message_id="bogus").state == "running?"
    assert status.collect(timezone.now())["schedullers"]["tests"]["counts"]["running?"] == 1


@server_database_only
def test_the_database_clock_is_read_as_the_statement_runs_not_when_connecting_or_the_transaction_began():
    """On the same host the offset is about zero. A slow connection set up between the two local readings
    used to put this clock ahead by half of it (alarms claimed early for the first minute of a process);
    inside a transaction PostgreSQL's CURRENT_TIMESTAMP is the transaction's start."""

    def slow(sender, connection, **_):
        time.sleep(0.3)

    connection.close()
    connection_created.connect(slow)
    try:
        clock = DatabaseClock()
        clock.now()  # connects, slowly, then measures
    finally:
        connection_created.disconnect(slow)
    assert abs(clock.offset) < 0.05, clock.offset
    with transaction.atomic():
        connection.cursor().execute("SELECT 1")  # the transaction has begun on the server
        time.sleep(0.3)
        clock = DatabaseClock()
        clock.now()
    assert abs(clock.offset) < 0.05, clock.offset


@server_database_only
def test_a_beat_whose_clock_runs_an_hour_fast_still_follows_the_database_clock(beat):
    alarms = TestAlarms()
    alarms.dispatch(Message.new("testapp.record", id="in-a-minute"), "agg", in_ms=60_000)
    alarms.dispatch(Message.new("testapp.record", id="due-now"), "agg", in_ms=0)
    fast = DatabaseClock(local=lambda: time.time() + 3600)
    scheduler = beat(alarm_clock=fast)
    for _ in range(3):
        scheduler.tick_alarms(fast.now())
    assert 3590 < -fast.offset < 3610
    assert Alarm.objects.get(message_id="due-now").attempt == 1  # published (a worker may have finished it)
    in_a_minute = Alarm.objects.get(message_id="in-a-minute")
    assert in_a_minute.state == states.PENDING and in_a_minute.attempt == 0


@pytest.mark.usefixtures("worker")
def test_a_timed_out_attempt_redelivered_late_does_not_run_next_to_its_retry(beat, tmp_path):
    """Attempt 1 waits in the queue past its deadline, times out and is retried; when a worker finally
    consumes the queue it gets both messages and runs only the retry (attempt 1 has expired)."""
    message = Message.new(
        "testapp.stale",
        id="stale-1",
        assigns={"timeout_ms": 400, "retries_left": 1, "retry_ms": 0, "retry_timeout_ms": 30_000},
    )
    from tests.celery_app import app

    with app.connection_for_write() as conn:  # RabbitMQ drops messages routed to a queue nobody declared
        app.amqp.queues[settings.CSCHED_STALE_QUEUE].bind(conn.default_channel).declare()
    TestAlarms().dispatch(message, "agg", in_ms=0)
    scheduler = beat()
    run_beat(
        scheduler,
        lambda: Alarm.objects.filter(message_id="stale-1", state=states.PUBLISHED, attempt=2).exists(),
        10,
        "attempt 1 to time out and attempt 2 to be published",
    )
    # this alarm's answers: a task an earlier test left in the default queue may answer its own meanwhile
    assert list(Answer.objects.filter(message_id="stale-1").values_list("status", flat=True)) == ["timeout"]
    late_worker = start_worker(
        tmp_path / "stale.log", "-c", "2", "-Q", settings.CSCHED_STALE_QUEUE, "-n", f"csched-stale-{os.getpid()}@%h"
    )
    try:
        run = wait_for(lambda: Run.objects.filter(message_id="stale-1").first(), 15, "the retry to run")
        worker_idle(15)  # attempt 1, if it were to run, would have run by the time both workers are idle
    finally:
        stop(late_worker)
    runs = list(Run.objects.filter(message_id="stale-1"))
    assert len(runs) == 1 and run.attempt_assigns["tries"] == 1  # attempt 2's message
    log = (tmp_path / "stale.log").read_text()
    # Redis hands the expired attempt to the worker, which discards it; RabbitMQ drops it itself (message TTL)
    assert "stale-1#1." not in log or "Discarding revoked task: testapp.stale[stale-1#1." in log
