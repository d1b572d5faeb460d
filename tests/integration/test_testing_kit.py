"""The testing kit (``celery_scheduller.testing``) on the test database (SQLite, PostgreSQL, MariaDB): its
clock, the assertions and their messages, ``run_due`` / ``drain`` through the real store and decision path,
simulated answers, a failing ``service_responded``, Django Tasks, several states per run, the ``TestCase``
mixin, and parity with a real worker and beat."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest
from django.test import TestCase
from django.utils import timezone

from celery_scheduller import OK, Fail, Message, Retry, Scheduller, states
from celery_scheduller.models import Alarm, AlarmAttempt
from celery_scheduller.testing import AlarmKitMixin, decide
from tests.conftest import run_beat
from tests.testapp.alarms import BrokenAlarms, TestAlarms
from tests.testapp.models import Answer, Run

pytestmark = pytest.mark.django_db


class Daily(Scheduller):
    """Retries a failing delivery once a day, 30 times, then gives up."""

    name = "kit-daily"

    def service_responded(self, message: Message) -> Any:
        tries = message.assigns.get("tries", 0)
        if message.response is not None and message.response.ok:
            return OK
        if tries >= 30:
            return Fail(f"gave up after {tries + 1} days")
        return Retry(86_400_000, message.assign("tries", tries + 1))


def test_the_clock_moves_only_when_the_test_moves_it_and_the_api_reads_it(alarm_kit):
    start = alarm_kit.now
    saved = TestAlarms().dispatch(Message.new("testapp.record", id="soon"), "agg", in_ms=60_000)
    assert saved.dispatch_at == start + dt.timedelta(minutes=1)
    assert alarm_kit.run_due() == []  # not due by the kit's clock
    later = alarm_kit.advance(seconds=59)
    assert later - start == dt.timedelta(seconds=59)
    assert alarm_kit.run_due() == []
    alarm_kit.advance(1_500)
    [delivery] = alarm_kit.run_due()
    assert (delivery.message_id, delivery.action, delivery.ran) == ("soon", "finished", True)
    target = dt.datetime(2031, 1, 1, tzinfo=dt.UTC)
    assert alarm_kit.travel_to(target) == target == alarm_kit.now
    with pytest.raises(ValueError, match="only moves forward"):
        alarm_kit.advance(-1)
    with pytest.raises(ValueError, match="aware"):
        alarm_kit.travel_to(dt.datetime(2031, 1, 2))  # noqa: DTZ001


def test_run_due_runs_the_task_in_process_with_its_message_and_the_real_decision(alarm_kit):
    message = Message.new("testapp.record", {"result": 7}, id="now", assigns={"note": "x"})
    TestAlarms().dispatch(message, "order-1", in_ms=0)

    [delivery] = alarm_kit.run_due()

    run = Run.objects.get(message_id="now")  # the task ran here, and current_message() was its message
    assert run.kwargs == {"result": 7} and run.attempt_assigns["note"] == "x"
    assert (delivery.task, delivery.attempt, delivery.response.status, delivery.response.value) == (
        "testapp.record",
        1,
        "ok",
        7,
    )
    answer = Answer.objects.get(message_id="now")  # service_responded saw the response
    assert (answer.status, answer.value, answer.decision) == ("ok", 7, "ok")
    [view] = alarm_kit.dispatched(message_id="now")
    assert view.state == states.FINISHED and view.last_response["value"] == 7


def test_a_task_that_raises_is_an_error_response_and_a_retry_becomes_due_by_the_clock(alarm_kit):
    assigns = {"retries_left": 2, "retry_ms": 5_000}
    TestAlarms().dispatch(Message.new("testapp.fail", id="flaky", assigns=assigns), "agg", in_ms=0)

    [first] = alarm_kit.run_due()
    assert first.response.status == "error" and first.response.error == "RuntimeError: it failed"
    assert first.action == "retried" and first.retry_at == first.delivered_at + dt.timedelta(seconds=5)
    assert alarm_kit.run_due() == []  # the retry waits for the clock
    rest = alarm_kit.drain()
    assert [d.action for d in rest] == ["retried", "finished"] and [d.attempt for d in rest] == [2, 3]
    [view] = alarm_kit.dispatched(message_id="flaky")
    assert [a["decision"] for a in view.attempts] == ["retry in 5000 ms", "retry in 5000 ms", "ok"]


@pytest.fixture
def daily(settings):
    settings.CELERY_SCHEDULLER_CLASSES = [*settings.CELERY_SCHEDULLER_CLASSES, f"{__name__}.Daily"]


@pytest.mark.usefixtures("daily")
def test_a_retry_chain_of_thirty_simulated_days_runs_in_the_test(alarm_kit):
    alarm_kit.will_answer("daily", error="ConnectionError: the mail server is down", times=31)
    start = alarm_kit.now
    Daily().dispatch(Message.new("testapp.record", id="daily"), "user-1", in_ms=0)

    started = time.perf_counter()
    deliveries = alarm_kit.drain()
    took = time.perf_counter() - started

    assert [d.action for d in deliveries] == ["retried"] * 30 + ["failed"]
    assert deliveries[-1].reason == "gave up after 31 days"
    assert alarm_kit.now - start == dt.timedelta(days=30)
    assert Alarm.objects.get(message_id="daily").state == states.FAILED
    assert AlarmAttempt.objects.filter(message_id="daily").count() == 31
    print(f"30 simulated days of daily retries (31 deliveries) in {took * 1000:.0f} ms")


def test_assertions_find_alarms_and_their_failures_list_what_was_dispatched(alarm_kit):
    alarms = TestAlarms()
    alarms.dispatch(Message.new("testapp.record", {"to": "ada"}, id="r-ada"), "order-1", in_ms=3_600_000)
    alarms.dispatch(Message.new("testapp.noop", id="r-noop"), "order-2", in_ms=60_000)

    [found] = alarm_kit.assert_dispatched("testapp.record", aggregate_id="order-1", kwargs={"to": "ada"})
    assert found.message_id == "r-ada" and found.scheduller == "tests"
    alarm_kit.assert_dispatched(scheduller=TestAlarms, count=2)
    alarm_kit.assert_dispatched(within=dt.timedelta(minutes=2), count=1)
    alarm_kit.assert_not_dispatched("testapp.record", aggregate_id="order-2")

    with pytest.raises(AssertionError) as missing:
        alarm_kit.assert_dispatched("testapp.record", aggregate_id="order-3")
    text = str(missing.value)
    assert "no alarm dispatched matching task='testapp.record', aggregate_id='order-3'" in text
    assert "dispatched (2):" in text and "r-ada: task=testapp.record aggregate='order-1'" in text
    assert "r-noop: task=testapp.noop" in text and "1 h from now by the kit's clock" in text

    with pytest.raises(AssertionError) as counted:
        alarm_kit.assert_dispatched(scheduller="tests", count=3)
    assert "2 alarms, not 3, dispatched matching scheduller='tests'" in str(counted.value)

    with pytest.raises(AssertionError) as unwanted:
        alarm_kit.assert_not_dispatched(kwargs={"to": "ada"})
    assert "1 alarm(s) dispatched matching kwargs={'to': 'ada'}:\n  - r-ada:" in str(unwanted.value)


def test_an_empty_schedule_says_so(alarm_kit):
    with pytest.raises(AssertionError, match="nothing was dispatched"):
        alarm_kit.assert_dispatched("testapp.record")


@pytest.mark.parametrize(
    ("answer", "status", "error_part"),
    [
        ({"value": {"sent": True}}, "ok", None),
        ({"error": ValueError("bad address")}, "error", "ValueError: bad address"),
        ({"error": "SMTPError: 550"}, "error", "SMTPError: 550"),
        ({"timeout": True}, "timeout", None),
        ({"lost": True}, "error", "WorkerLostError"),
    ],
)
def test_simulated_answers_drive_service_responded_without_running_the_task(alarm_kit, answer, status, error_part):
    assigns = {"retries_left": 1, "retry_ms": 1_000, "retry_errors_only": True}
    TestAlarms().dispatch(Message.new("testapp.record", id="sim", assigns=assigns), "agg", in_ms=0)

    delivery = alarm_kit.answer("sim", **answer)

    assert not delivery.ran and not Run.objects.filter(message_id="sim").exists()
    assert delivery.response.status == status
    if error_part:
        assert error_part in delivery.response.error
    assert delivery.action == ("finished" if status == "ok" else "retried")
    assert Answer.objects.get(message_id="sim").status == status
    if status != "ok":  # the retry runs the real task
        assert [d.action for d in alarm_kit.drain()] == ["finished"]
        assert Run.objects.filter(message_id="sim").count() == 1


def test_answer_refuses_an_alarm_that_is_not_due_or_not_there(alarm_kit):
    TestAlarms().dispatch(Message.new("testapp.record", id="later"), "agg", in_ms=60_000)
    with pytest.raises(AssertionError, match=r"due .*after the kit's clock: advance the clock first"):
        alarm_kit.answer("later", value=1)
    with pytest.raises(AssertionError, match="no alarm 'nowhere' is stored"):
        alarm_kit.answer("nowhere", value=1)
    with pytest.raises(ValueError, match="exactly one of"):
        alarm_kit.will_answer("later", value=1, timeout=True)


def test_a_failing_service_responded_is_shown_and_decided_again_after_its_backoff(alarm_kit, settings):
    settings.CELERY_SCHEDULLER_ERROR_BACKOFF = 1_000
    BrokenAlarms().dispatch(Message.new("testapp.record", id="broken"), "agg", in_ms=0)

    [first] = alarm_kit.run_due()
    assert (first.ran, first.action) == (True, "error_backoff")
    assert "RuntimeError: service_responded blew up" in first.reason
    alarm = Alarm.objects.get(message_id="broken")
    assert (alarm.state, alarm.failing) == (states.PUBLISHED, True)  # as a real beat leaves it

    rest = alarm_kit.drain()
    # decided again with the kept response (the task does not run again): garbage, a Retry too far, then OK
    assert [(d.ran, d.action) for d in rest] == [
        (False, "error_backoff"),
        (False, "error_backoff"),
        (False, "finished"),
    ]
    assert Run.objects.filter(message_id="broken").count() == 1
    assert list(Answer.objects.filter(message_id="broken").values_list("decision", flat=True)) == ["0", "1", "2", "3"]


def test_a_deferred_django_task_is_drained_the_same_way(alarm_kit):
    from tests.testapp import jobs

    result = jobs.add.using(run_after=alarm_kit.now + dt.timedelta(hours=2)).enqueue(2, 3)
    alarm_kit.assert_dispatched("celery_scheduller.run_django_task", scheduller="django_tasks")
    assert alarm_kit.run_due() == []

    [delivery] = alarm_kit.drain()

    assert delivery.action == "finished"
    result.refresh()
    assert str(result.status).endswith("SUCCESSFUL") and result.return_value == 5


def test_a_django_task_retried_by_its_backend_is_drained_to_its_last_attempt(alarm_kit):
    from tests.testapp import jobs

    result = jobs.flaky.using(run_after=alarm_kit.now + dt.timedelta(minutes=1)).enqueue(succeed_on=3)
    deliveries = alarm_kit.drain()
    assert [d.action for d in deliveries] == ["retried", "retried", "finished"]
    result.refresh()
    assert result.return_value == 3 and len(result.errors) == 2


@pytest.mark.django_db(transaction=True)
def test_the_kit_in_a_transactional_test(transactional_db, alarm_kit):
    TestAlarms().dispatch(Message.new("testapp.record", id="committed"), "agg", in_ms=1_000)
    alarm_kit.advance(1_000)
    [delivery] = alarm_kit.run_due()
    assert delivery.action == "finished" and Run.objects.filter(message_id="committed").exists()


@pytest.mark.parametrize("interval_ms", [1_000, 2_000])
def test_each_test_gives_its_schedullers_their_state(alarm_kit, interval_ms):
    alarms = TestAlarms(state={"interval_ms": interval_ms})  # a different state in each test: not refused
    assert alarms.in_memory_interval() == interval_ms
    alarm_kit.serve(TestAlarms, {"interval_ms": 5})
    from celery_scheduller import registry

    assert registry.get("tests").in_memory_interval() == 5


def test_the_pure_helper_decides_without_a_database():
    message = Message.new("testapp.record", id="pure", assigns={"tries": 30})
    assert decide(Daily, message, value="sent") is OK
    failed = decide(Daily, message, error=OSError("down"))
    assert isinstance(failed, Fail) and failed.reason == "gave up after 31 days"
    retried = decide(Daily, message.assign("tries", 2), timeout=True)
    assert isinstance(retried, Retry) and retried.in_ms == 86_400_000 and retried.message.assigns["tries"] == 3
    assert decide(TestAlarms(), Message.new("testapp.record", id="x"), lost=True) is OK


class KitInATestCase(AlarmKitMixin, TestCase):
    def test_the_mixin_gives_a_started_kit(self) -> None:
        TestAlarms().dispatch(Message.new("testapp.record", id="tc"), "agg", in_ms=10_000)
        self.alarm_kit.assert_dispatched("testapp.record", count=1)
        self.alarm_kit.advance(seconds=10)
        [delivery] = self.alarm_kit.run_due()
        self.assertEqual(delivery.action, "finished")


# -- parity with a real worker and beat ----------------------------------------------------------------------


def _outcome(message_id: str) -> tuple[Any, ...]:
    alarm = Alarm.objects.get(message_id=message_id)
    attempts = [
        (a.attempt, a.status, a.decision)
        for a in AlarmAttempt.objects.filter(message_id=message_id).order_by("attempt", "pk")
    ]
    answers = list(Answer.objects.filter(message_id=message_id).order_by("pk").values_list("status", "decision"))
    return alarm.state, alarm.attempt, attempts, alarm.last_response["status"], answers


SCENARIO = [
    ("p-ok", "testapp.record", {}),
    ("p-retry", "testapp.record", {"retries_left": 2, "retry_ms": 100}),
    ("p-fail", "testapp.fail", {"retries_left": 1, "retry_ms": 100, "fail_reason": "no luck"}),
]


def _dispatch_scenario(prefix: str) -> None:
    alarms = TestAlarms()
    for message_id, task, assigns in SCENARIO:
        alarms.dispatch(Message.new(task, id=f"{prefix}{message_id}", assigns=assigns), "agg", in_ms=0)


@pytest.mark.django_db(transaction=True)
@pytest.mark.worker
@pytest.mark.usefixtures("worker")
def test_the_kit_ends_a_scenario_as_a_real_worker_and_beat_do(beat):
    _dispatch_scenario("real-")
    scheduler = beat()
    ids = [f"real-{message_id}" for message_id, *_ in SCENARIO]
    run_beat(
        scheduler,
        lambda: Alarm.objects.filter(message_id__in=ids, state__in=states.ENDED).count() == len(ids),
        30,
        "the real run to end every alarm",
    )
    real = {message_id: _outcome(f"real-{message_id}") for message_id, *_ in SCENARIO}

    from celery_scheduller.testing import AlarmKit

    with AlarmKit() as kit:
        _dispatch_scenario("kit-")
        kit.drain()
        kept = {message_id: _outcome(f"kit-{message_id}") for message_id, *_ in SCENARIO}

    assert kept == real
    assert real["p-fail"][0] == states.FAILED and real["p-retry"][1] == 3


def test_the_kits_clock_stands_still_and_is_not_djangos(alarm_kit):
    """The kit moves the package's clock, not Django's (``timezone.now()``)."""
    before, kit_before = timezone.now(), alarm_kit.now
    time.sleep(0.01)
    assert alarm_kit.now == kit_before  # frozen: it moves only when the test moves it
    alarm_kit.advance(days=1)
    assert timezone.now() - before < dt.timedelta(hours=1)
    assert alarm_kit.now - kit_before == dt.timedelta(days=1)


@pytest.mark.parametrize("library", ["time_machine", "freezegun"])
def test_a_kit_not_frozen_follows_time_machine_and_freezegun(library):
    from celery_scheduller.testing import AlarmKit

    start = dt.datetime(2032, 3, 1, 9, 0, tzinfo=dt.UTC)
    if library == "time_machine":
        import time_machine

        traveller: Any = time_machine.travel(start, tick=False)
    else:
        import freezegun

        traveller = freezegun.freeze_time(start)
    with traveller as frozen, AlarmKit(frozen=False) as kit:
        TestAlarms().dispatch(Message.new("testapp.record", id="moved"), "agg", in_ms=3_600_000)
        assert kit.now == start and Alarm.objects.get(message_id="moved").dispatch_at == start + dt.timedelta(hours=1)
        if library == "time_machine":
            frozen.shift(dt.timedelta(hours=1))
        else:
            frozen.tick(dt.timedelta(hours=1))
        assert [d.message_id for d in kit.run_due()] == ["moved"]  # due by the library's time
        kit.advance(minutes=5)
        assert kit.now == start + dt.timedelta(hours=1, minutes=5)
