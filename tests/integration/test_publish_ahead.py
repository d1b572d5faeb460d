"""PUBLISH_AHEAD: alarms published before their time, as tasks with an ``eta``, start on time; a
cancelled one is revoked; the claim's deadlines count from the due time."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from django.test import override_settings

from celery_scheduller import Message, states, store
from celery_scheduller.exceptions import ConfigurationError
from celery_scheduller.models import Alarm
from celery_scheduller.scheduller import _now
from tests.conftest import on_schedule, run_beat, wait_for, worker_idle
from tests.testapp.alarms import TestAlarms
from tests.testapp.models import Answer, Run

pytestmark = pytest.mark.django_db(transaction=True)

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)


def test_a_claim_ahead_takes_what_is_due_by_then_and_counts_each_deadline_from_its_due_time():
    alarms = TestAlarms()
    for message_id, in_ms in (("due", -100), ("soon", 800), ("within", 1_500), ("beyond", 2_500)):
        at = NOW + dt.timedelta(milliseconds=in_ms)
        alarms.dispatch(Message.new("testapp.record", id=message_id), "agg", at=at, now=NOW)

    rows = store.claim_due(["tests"], NOW, 100, until=NOW + dt.timedelta(seconds=2))

    claimed = {row["message_id"]: row for row in rows}
    assert sorted(claimed) == ["due", "soon", "within"]
    stored = {alarm.message_id: alarm for alarm in Alarm.objects.all()}
    assert stored["beyond"].state == states.PENDING
    timeout = dt.timedelta(milliseconds=stored["due"].timeout_ms)
    assert stored["due"].deadline == claimed["due"]["deadline"] == NOW + timeout
    for message_id in ("soon", "within"):
        due = stored[message_id].dispatch_at
        assert stored[message_id].deadline == claimed[message_id]["deadline"] == due + timeout
        assert stored[message_id].published_at == NOW


def test_the_capped_claim_ahead_does_the_same():  # one statement on PostgreSQL
    alarms = TestAlarms()
    for message_id, in_ms in (("due", 0), ("soon", 900), ("beyond", 3_000)):
        alarms.dispatch(Message.new("testapp.record", id=message_id), "agg", in_ms=in_ms, now=NOW)

    room, rows = store.claim_due_within(["tests"], NOW, 100, 10, until=NOW + dt.timedelta(seconds=1))

    assert room == 10
    assert sorted(row["message_id"] for row in rows) == ["due", "soon"]
    soon = Alarm.objects.get(message_id="soon")
    timeout = dt.timedelta(milliseconds=soon.timeout_ms)
    assert soon.deadline == soon.dispatch_at + timeout
    assert Alarm.objects.get(message_id="due").deadline == NOW + timeout


def test_cancel_names_the_attempts_published_ahead_of_their_time():
    alarms = TestAlarms()
    for message_id, in_ms in (("ran", -10), ("ahead", 900), ("waiting", 60_000)):
        at = NOW + dt.timedelta(milliseconds=in_ms)
        alarms.dispatch(Message.new("testapp.record", id=message_id), "agg", at=at, now=NOW)
    store.claim_due(["tests"], NOW, 100, until=NOW + dt.timedelta(seconds=1))

    pk = Alarm.objects.get(message_id="ahead").pk
    cancelled, ahead = store.cancel("tests", NOW, False, aggregate_id="agg")

    assert sorted(cancelled) == ["ahead", "ran", "waiting"]
    assert ahead == [("ahead", 1, pk)]  # "ran" was due (a worker may run it), "waiting" never published
    assert not Alarm.objects.exists()


@pytest.mark.parametrize("value", [-1, 60_001, 1.5, "500", True])
def test_a_bad_publish_ahead_is_refused_by_name(value):
    from celery_scheduller.conf import settings

    with override_settings(CELERY_SCHEDULLER_PUBLISH_AHEAD=value), pytest.raises(ConfigurationError) as raised:
        settings.publish_ahead()
    assert "CELERY_SCHEDULLER_PUBLISH_AHEAD" in str(raised.value) and repr(value) in str(raised.value)


@pytest.mark.worker
@pytest.mark.usefixtures("worker")
@override_settings(CELERY_SCHEDULLER_PUBLISH_AHEAD=1_500)
def test_an_alarm_published_ahead_is_held_by_the_worker_and_starts_at_its_time(beat):
    alarms = TestAlarms()
    scheduler = beat()
    scheduler.tick_alarms(time.time())
    saved = alarms.dispatch(Message.new("testapp.record", {"result": 7}, id="ahead"), "agg", in_ms=2_500)
    due = saved.dispatch_at

    alarm = run_beat(
        scheduler, lambda: Alarm.objects.filter(message_id="ahead", state=states.PUBLISHED).first(), 5, "the publish"
    )
    assert _now() < due - dt.timedelta(milliseconds=300)  # out well before its time ...
    assert not Run.objects.filter(message_id="ahead").exists()  # ... and not started yet
    assert alarm.deadline == due + dt.timedelta(milliseconds=alarm.timeout_ms)

    run = run_beat(scheduler, lambda: Run.objects.filter(message_id="ahead").first(), 10, "the run")
    lateness = (run.started_at - due).total_seconds()
    assert lateness >= -0.05, lateness  # held by the worker until its time, not run early
    assert "late" not in run.attempt_assigns
    answer = wait_for(lambda: Answer.objects.filter(message_id="ahead").first(), 10, "service_responded")
    assert (answer.status, answer.value, answer.decision) == ("ok", 7, "ok")
    wait_for(lambda: not on_schedule("ahead"), 10, "the alarm to be removed")


@pytest.mark.worker
@pytest.mark.usefixtures("worker")
@override_settings(CELERY_SCHEDULLER_PUBLISH_AHEAD=3_000)
def test_cancelling_an_alarm_published_ahead_revokes_its_task(beat):
    alarms = TestAlarms()
    scheduler = beat()
    scheduler.tick_alarms(time.time())
    for message_id in ("kept", "cancelled"):
        alarms.dispatch(Message.new("testapp.record", id=message_id), "agg", in_ms=2_000)
    published = Alarm.objects.filter(message_id__in=["kept", "cancelled"], state=states.PUBLISHED)
    run_beat(scheduler, lambda: published.count() == 2, 5, "both to be published ahead")
    wait_for(_held_by_workers, 10, "the worker to take both in and hold them until their eta")

    assert alarms.cancel("cancelled") is True

    run_beat(scheduler, lambda: Run.objects.filter(message_id="kept").exists(), 10, "the kept alarm to run")
    worker_idle(10)  # the cancelled one, due at the same time, would have run by the time the worker is idle
    assert not Run.objects.filter(message_id="cancelled").exists()
    assert not on_schedule("cancelled")


def test_a_cancel_whose_revoke_cannot_reach_the_broker_still_stands(caplog):
    from tests.celery_app import app

    alarms = TestAlarms()
    now = _now()
    alarms.dispatch(Message.new("testapp.record", id="unrevoked"), "agg", in_ms=5_000, now=now)
    store.claim_due(["tests"], now, 10, until=now + dt.timedelta(seconds=10))  # published ahead
    saved = app.conf.broker_write_url
    app.conf.broker_write_url = "redis://127.0.0.1:1/0"  # nothing listens there
    try:
        with caplog.at_level("WARNING", logger="celery_scheduller"):
            assert alarms.cancel("unrevoked") is True
    finally:
        app.conf.broker_write_url = saved

    assert not on_schedule("unrevoked")  # cancelled (kept as history by the test settings)
    warned = [record for record in caplog.records if getattr(record, "action", None) == "revoke_failed"]
    assert len(warned) == 1 and "could not revoke 1 alarms published ahead" in warned[0].getMessage()


def _held_by_workers() -> bool:
    """Whether the workers hold both of the test's tasks for their eta."""
    from tests.celery_app import app

    held = app.control.inspect(timeout=0.5).scheduled() or {}
    return sum(len(tasks) for tasks in held.values()) >= 2


def test_the_guards_look_runs_the_current_attempt_drops_the_rest_and_waits_for_a_locked_row():
    import threading

    from django.db import connections

    from celery_scheduller import db
    from celery_scheduller.store import orm

    alarms = TestAlarms()
    for message_id in ("current", "moved", "cancelled", "locked"):
        alarms.dispatch(Message.new("testapp.record", id=message_id), "agg", at=NOW + dt.timedelta(seconds=1), now=NOW)
    rows = {row["message_id"]: row for row in store.claim_due(["tests"], NOW, 100, until=NOW + dt.timedelta(seconds=2))}
    refs = {message_id: store.AttemptRef.of_row(row) for message_id, row in rows.items()}
    assert store.reschedule("tests", "moved", NOW + dt.timedelta(minutes=5), NOW)[0]
    assert store.cancel("tests", NOW, False, message_ids=["cancelled"])[0] == ["cancelled"]
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:  # a cancel whose transaction is still open
        try:
            with db.atomic():
                list(Alarm.objects.select_for_update().filter(message_id="locked").values_list("pk"))
                holding.set()
                release.wait(10)
        finally:
            connections.close_all()

    locker = threading.Thread(target=hold)
    locker.start()
    try:
        assert holding.wait(10)
        verdicts = store.held_verdicts(list(refs.values()))
    finally:
        release.set()
        locker.join()
    by_id = {message_id: verdicts[ref.pk] for message_id, ref in refs.items()}
    expected_locked = orm.RUN if db.vendor() == "sqlite" else orm.WAIT  # SQLite has no row locks
    assert by_id == {"current": orm.RUN, "moved": orm.DROP, "cancelled": orm.DROP, "locked": expected_locked}
    assert store.held_verdicts([refs["locked"]]) == {refs["locked"].pk: orm.RUN}  # released: current again
