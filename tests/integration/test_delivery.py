"""Delivery, responses and retries through a real worker and an in-process beat."""

from __future__ import annotations

import datetime as dt
import itertools
import time

import pytest
from django.utils import timezone

from celery_scheduller import Message, states
from celery_scheduller.models import Alarm, AlarmAttempt
from tests.conftest import on_schedule, run_beat, wait_for, worker_idle
from tests.testapp.alarms import TestAlarms
from tests.testapp.models import Answer, Run

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker, pytest.mark.usefixtures("worker")]


def test_alarm_is_delivered_on_time_and_removed_after_ok(beat):
    alarms = TestAlarms()
    scheduler = beat()
    scheduler.tick_alarms(time.time())  # the window is loaded before the alarm exists: a late arrival
    saved = alarms.dispatch(Message.new("testapp.record", {"result": 42}, id="on-time"), "agg-1", in_ms=1500)

    run = run_beat(scheduler, lambda: Run.objects.filter(message_id="on-time").first(), 10, "the task to run")
    lateness = (run.started_at - saved.dispatch_at).total_seconds()
    assert lateness >= -0.05, lateness  # never early (how late: bench/compare.py)
    assert run.kwargs == {"result": 42}
    answer = wait_for(lambda: Answer.objects.filter(message_id="on-time").first(), 10, "service_responded")
    assert (answer.status, answer.value, answer.decision) == ("ok", 42, "ok")
    wait_for(lambda: not on_schedule("on-time"), 10, "the alarm to be removed")


def test_alarm_loaded_with_the_window_fires_on_time(beat):
    alarms = TestAlarms()
    saved = alarms.dispatch(Message.new("testapp.record", id="in-window"), "agg", in_ms=1200)
    scheduler = beat()
    scheduler.tick_alarms(time.time())
    assert "in-window" in scheduler.alarm_engine.heap
    run = run_beat(scheduler, lambda: Run.objects.filter(message_id="in-window").first(), 10, "the run")
    lateness = (run.started_at - saved.dispatch_at).total_seconds()
    assert lateness >= 0, lateness
    assert "late" not in run.attempt_assigns


def test_retry_delivers_the_modified_message_until_ok(beat):
    alarms = TestAlarms()
    message = Message.new("testapp.record", {"n": 1}, id="retried", assigns={"retries_left": 2, "retry_ms": 300})
    alarms.dispatch(message, "agg", in_ms=0)
    scheduler = beat()
    run_beat(scheduler, lambda: Answer.objects.filter(message_id="retried", decision="ok").exists(), 20, "final OK")

    runs = list(Run.objects.filter(message_id="retried").order_by("started_at"))
    assert [r.kwargs for r in runs] == [{"n": 1}, {"n": 1, "try": 1}, {"n": 1, "try": 2}]
    assert [r.attempt_assigns.get("tries") for r in runs] == [None, 1, 2]
    gaps = [(b.started_at - a.started_at).total_seconds() for a, b in itertools.pairwise(runs)]
    assert all(gap >= 0.3 for gap in gaps), gaps  # each retry no sooner than its in_ms
    answers = list(Answer.objects.filter(message_id="retried").order_by("at").values_list("decision", flat=True))
    assert answers == ["retry 300", "retry 300", "ok"]
    wait_for(lambda: not on_schedule("retried"), 10, "removal")


def test_exception_becomes_an_error_response(beat):
    TestAlarms().dispatch(Message.new("testapp.fail", {"reason": "card declined"}, id="fails"), "agg", in_ms=0)
    scheduler = beat()
    answer = run_beat(scheduler, lambda: Answer.objects.filter(message_id="fails").first(), 10, "the answer")
    assert answer.status == "error"
    assert answer.error == "RuntimeError: card declined"


def test_no_response_within_dispatch_timeout_is_a_timeout_and_the_late_result_is_ignored(beat):
    message = Message.new("testapp.sleep", {"seconds": 2.5}, id="slow", assigns={"timeout_ms": 700})
    TestAlarms().dispatch(message, "agg", in_ms=0)
    scheduler = beat()
    answer = run_beat(scheduler, lambda: Answer.objects.filter(message_id="slow").first(), 10, "the timeout")
    assert answer.status == "timeout"
    published = Run.objects.get(message_id="slow").started_at
    assert (answer.at - published).total_seconds() >= 0.6  # not before its deadline
    wait_for(lambda: not on_schedule("slow"), 5, "the timeout's answer stored")
    worker_idle(10)  # the task finished after its deadline and its response was handled: ignored
    assert list(Answer.objects.filter(message_id="slow").values_list("status", flat=True)) == ["timeout"]


def test_late_alarm_is_published_at_once_flagged_late(beat):
    past = timezone.now() - dt.timedelta(minutes=5)
    saved = TestAlarms().dispatch(Message.new("testapp.record", id="late-one"), "agg", at=past)
    assert saved.assigns["late"] is True
    scheduler = beat()
    started = time.time()
    run = run_beat(scheduler, lambda: Run.objects.filter(message_id="late-one").first(), 10, "the run")
    assert run.attempt_assigns["late"] is True
    assert run.started_at.timestamp() >= started


def test_alarms_overdue_when_beat_starts_are_flagged_late(beat):
    alarms = TestAlarms()
    alarms.dispatch(Message.new("testapp.record", id="missed"), "agg", in_ms=100)
    time.sleep(1.5)  # no beat was running when it came due
    run = run_beat(beat(), lambda: Run.objects.filter(message_id="missed").first(), 10, "the run")
    assert run.attempt_assigns["late"] is True


def test_dispatching_a_pending_id_again_changes_nothing(beat):
    alarms = TestAlarms()
    first = alarms.dispatch(Message.new("testapp.record", {"v": 1}, id="dup"), "agg", in_ms=800)
    alarms.dispatch(Message.new("testapp.record", {"v": 2}, id="dup"), "agg", in_ms=60_000)
    row = Alarm.objects.get(message_id="dup")
    assert row.dispatch_at == first.dispatch_at and row.raw_request == {"v": 1}
    scheduler = beat()
    run_beat(scheduler, lambda: Answer.objects.filter(message_id="dup").exists(), 10, "the answer")
    worker_idle(10)
    assert Run.objects.filter(message_id="dup").count() == 1


def test_cancel_and_cancel_aggregate(beat):
    alarms = TestAlarms()
    for i in range(3):
        alarms.dispatch(Message.new("testapp.record", id=f"order-{i}"), "order" if i else "other", in_ms=500)
    alarms.dispatch(Message.new("testapp.record", id="keeper"), "keep", in_ms=500)
    assert alarms.cancel("order-0") is True
    assert alarms.cancel("order-0") is False
    assert alarms.cancel_aggregate("order") == 2
    assert alarms.cancel_aggregate("order") == 0
    run_beat(beat(), lambda: Answer.objects.filter(message_id="keeper").exists(), 10, "the kept alarm")
    worker_idle(10)
    assert list(Run.objects.values_list("message_id", flat=True)) == ["keeper"]


def test_a_failing_service_responded_is_called_again_with_the_same_response_and_the_task_runs_once(beat):
    """service_responded raises, then returns garbage, then an invalid Retry, then OK: it is called four times
    with the task's one response, after growing back-offs, while the task ran once (a side effect, not four).
    The history shows the task's outcome (ok) beside each failure of the callback."""
    from tests.testapp.alarms import BrokenAlarms

    BrokenAlarms().dispatch(Message.new("testapp.record", id="broken"), "agg", in_ms=0)
    scheduler = beat()
    run_beat(scheduler, lambda: not on_schedule("broken"), 20, "the alarm to end")
    assert Run.objects.filter(message_id="broken").count() == 1
    answers = list(Answer.objects.filter(message_id="broken").order_by("at").values_list("decision", "status"))
    assert answers == [("0", "ok"), ("1", "ok"), ("2", "ok"), ("3", "ok")]
    alarm = Alarm.objects.get(message_id="broken")
    assert (alarm.state, alarm.attempt, alarm.callback_failures) == (states.FINISHED, 1, 3)
    history = list(
        AlarmAttempt.objects.filter(message_id="broken")
        .order_by("responded_at")
        .values_list("attempt", "status", "decision")
    )
    assert [(attempt, status) for attempt, status, _ in history] == [(1, "ok")] * 4
    decisions = [decision for _, _, decision in history]
    assert decisions[0].startswith("service_responded failed (1): RuntimeError")
    assert decisions[1].startswith("service_responded failed (2): InvalidRespons")
    assert decisions[2].startswith("service_responded failed (3)")
    assert decisions[3] == "ok"


def test_hard_time_limit_becomes_an_error_response(beat):
    message = Message.new("testapp.hang", id="hangs", assigns={"timeout_ms": 20_000})
    TestAlarms().dispatch(message, "agg", in_ms=0)
    answer = run_beat(beat(), lambda: Answer.objects.filter(message_id="hangs").first(), 15, "the answer")
    assert answer.status == "error"
    assert answer.error.startswith("TimeLimitExceeded")


def test_lost_worker_becomes_an_error_response(beat):
    message = Message.new("testapp.die", id="dies", assigns={"timeout_ms": 20_000})
    TestAlarms().dispatch(message, "agg", in_ms=0)
    answer = run_beat(beat(), lambda: Answer.objects.filter(message_id="dies").first(), 15, "the answer")
    assert answer.status == "error"
    assert answer.error.startswith("WorkerLostError")


def test_current_message_is_none_outside_an_alarm_delivery():
    from tests.testapp.tasks import record

    record.delay(result="plain")
    run = wait_for(lambda: Run.objects.filter(task="record", kwargs__result="plain").first(), 10, "the plain run")
    assert run.message_id == "" and run.attempt_assigns == {}
