"""History, pruning, status, signals, system checks, the operations API and admin permissions."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings
from django.utils import timezone

from celery_scheduller import Message, Response, checks, responses, signals, states, store
from celery_scheduller.models import Alarm, AlarmAttempt, BeatRecord
from tests.conftest import run_beat, wait_for
from tests.testapp.alarms import TestAlarms
from tests.testapp.models import Answer

pytestmark = pytest.mark.django_db(transaction=True)

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)


def claimed(message_id: str, now: dt.datetime = NOW) -> tuple[store.AttemptRef, Message]:
    """Claim the (due) alarm as beat would, returning its published attempt."""
    rows = [row for row in store.claim_due(["tests"], now, 100) if row["message_id"] == message_id]
    assert len(rows) == 1
    return store.AttemptRef.of_row(rows[0]), store.message_from_row(rows[0])


def test_ok_removes_the_alarm_at_once_without_history():
    alarms = TestAlarms()
    alarms.dispatch(Message.new("testapp.record", id="gone", assigns={"retries_left": 1}), "agg", at=NOW, now=NOW)
    with override_settings(CELERY_SCHEDULLER_KEEP_FINISHED=None):
        ref, message = claimed("gone")
        assert responses.respond(ref, message, Response("error", error="E"), NOW) == "retried"
        assert AlarmAttempt.objects.filter(message_id="gone").count() == 1  # visible while it retries
        later = NOW + dt.timedelta(seconds=1)
        ref, message = claimed("gone", later)
        assert responses.respond(ref, message, Response("ok", value=1), later) == "finished"
    assert not Alarm.objects.filter(message_id="gone").exists()
    assert not AlarmAttempt.objects.filter(message_id="gone").exists()


def test_history_is_kept_with_attempts_then_pruned():
    alarms = TestAlarms()
    alarms.dispatch(Message.new("testapp.record", id="kept", assigns={"retries_left": 1}), "agg", at=NOW, now=NOW)
    ref, message = claimed("kept")
    responses.respond(ref, message, Response("timeout"), NOW)
    later = NOW + dt.timedelta(seconds=1)
    ref, message = claimed("kept", later)
    assert responses.respond(ref, message, Response("ok", value="v"), later) == "finished"
    row = Alarm.objects.get(message_id="kept")
    assert (row.state, row.attempt, row.finished_at, row.last_response["status"]) == ("finished", 2, later, "ok")
    history = list(AlarmAttempt.objects.filter(message_id="kept").order_by("attempt").values_list("status", "decision"))
    assert history == [("timeout", "retry in 100 ms"), ("ok", "ok")]
    # the same id may be scheduled again once it ended
    alarms.dispatch(Message.new("testapp.record", id="kept"), "agg", in_ms=1000)
    assert Alarm.objects.get(message_id="kept").state == states.PENDING
    assert not AlarmAttempt.objects.filter(message_id="kept").exists()


def test_prune_command_removes_history_older_than_the_limit_in_batches():
    alarms = TestAlarms()
    for i in range(7):
        alarms.dispatch(Message.new("testapp.record", id=f"old-{i}"), "agg", in_ms=60_000)
    alarms.dispatch(Message.new("testapp.record", id="recent"), "agg", in_ms=60_000)
    alarms.dispatch(Message.new("testapp.record", id="pending"), "agg", in_ms=60_000)
    long_ago = timezone.now() - dt.timedelta(days=2)
    for i in range(7):
        alarms.cancel(f"old-{i}", now=long_ago)
    alarms.cancel("recent")
    assert Alarm.objects.filter(state=states.CANCELLED).count() == 8
    out = call_command_output("scheduller_prune", "--older-than", "86400", "--batch", "3")
    assert "pruned 7 ended alarms" in out
    assert sorted(Alarm.objects.values_list("message_id", flat=True)) == ["pending", "recent"]
    with override_settings(CELERY_SCHEDULLER_KEEP_FINISHED=None), pytest.raises(CommandError, match="KEEP_FINISHED"):
        call_command("scheduller_prune")


def test_prune_takes_the_oldest_ended_alarms_first_whatever_their_state():
    """A batch of the prune removes the alarms that ended longest ago; it took one state after another
    (every cancelled one before any failed one) while its index was led by ``state``."""
    alarms = TestAlarms()
    now = timezone.now()
    ended = {"failed-4d": (states.FAILED, 4), "cancelled-3d": (states.CANCELLED, 3), "failed-2d": (states.FAILED, 2)}
    ended["cancelled-1d"] = (states.CANCELLED, 1)
    for message_id, (state, days) in ended.items():
        alarms.dispatch(Message.new("testapp.record", id=message_id), "agg", in_ms=60_000)
        Alarm.objects.filter(message_id=message_id).update(state=state, finished_at=now - dt.timedelta(days=days))
    assert store.prune(now - dt.timedelta(hours=12), 2) == 2
    assert sorted(Alarm.objects.values_list("message_id", flat=True)) == ["cancelled-1d", "failed-2d"]


def test_beat_prunes_kept_history(beat):
    alarms = TestAlarms()
    alarms.dispatch(Message.new("testapp.record", id="to-prune"), "agg", in_ms=60_000)
    alarms.cancel("to-prune", now=timezone.now() - dt.timedelta(hours=2))
    beat().tick_alarms(time.time())  # the pass runs beside beat's loop (in its tick on SQLite)
    wait_for(lambda: not Alarm.objects.filter(message_id="to-prune").exists(), 10, "the pruner")


def call_command_output(*argv: str) -> str:
    from io import StringIO

    out = StringIO()
    call_command(*argv, stdout=out)
    return out.getvalue()


def test_status_reports_counts_overdue_in_flight_and_beats_with_an_exit_code(beat):
    alarms = TestAlarms()
    now = timezone.now()
    alarms.dispatch(Message.new("testapp.record", id="overdue"), "o-1", at=now - dt.timedelta(minutes=5))
    alarms.dispatch(Message.new("testapp.record", id="future"), "o-2", at=now + dt.timedelta(hours=1))
    alarms.dispatch(Message.new("testapp.record", id="flying"), "o-3", at=now - dt.timedelta(seconds=1))
    store.claim_due(["tests"], now, 1)  # the oldest first: "overdue" is now in flight
    scheduler = beat()
    scheduler.alarm_engine._record(time.time())
    report = json.loads(call_command_output("scheduller_status", "--json", "--max-overdue", "3600"))
    info = report["schedullers"]["tests"]
    assert info["counts"]["pending"] == 2 and info["counts"]["published"] == 1
    assert info["in_flight"] == 1 and info["oldest_deadline"] is not None
    assert info["overdue"] == 1 and 0.5 < info["oldest_overdue_seconds"] < 60
    assert info["next_due"].startswith((now + dt.timedelta(hours=1)).date().isoformat())
    assert report["healthy"] is True and info["failing"] == 0
    assert [b["name"] for b in report["beats"]] == [scheduler.alarm_engine.name]
    assert BeatRecord.objects.count() == 1

    alarms.cancel("flying")
    alarms.dispatch(Message.new("testapp.record", id="very-late"), "o-4", at=now - dt.timedelta(minutes=10))
    with pytest.raises(CommandError, match=r"overdue for 6\d\d\.\d+s") as failed:
        call_command("scheduller_status", "--max-overdue", "60")
    assert failed.value.returncode == 1
    Alarm.objects.filter(message_id="future").update(failing=True)  # retried after an error
    text = call_command_output("scheduller_status", "--max-overdue", "3600")
    assert "overdue 1, oldest 6" in text and "beat " in text and "failing 1 (retried" in text


@pytest.mark.usefixtures("worker")
def test_signals_follow_an_alarm(beat):
    seen: list[tuple[str, str, object]] = []

    def receiver(name):
        def on(sender, message=None, message_ids=None, attempt=None, **kwargs):
            seen.append((name, sender, message.id if message else tuple(message_ids)))

        return on

    names = ["published", "responded", "timed_out", "retried", "finished", "cancelled"]
    handlers = {name: receiver(name) for name in names}
    for name in names:
        getattr(signals, f"alarm_{name}").connect(handlers[name])
    signals.alarm_finished.connect(lambda **kwargs: 1 / 0, dispatch_uid="broken-receiver")  # must not break
    try:
        alarms = TestAlarms()
        alarms.dispatch(Message.new("testapp.record", id="sig", assigns={"retries_left": 1}), "agg", at=NOW, now=NOW)
        ref, message = claimed("sig")
        responses.respond(ref, message, Response("timeout"), NOW)
        later = NOW + dt.timedelta(seconds=1)
        ref, message = claimed("sig", later)
        assert responses.respond(ref, message, Response("ok"), later) == "finished"
        alarms.dispatch(Message.new("testapp.record", id="sig-2"), "agg", in_ms=0)
        alarms.cancel("sig-2")
        alarms.dispatch(Message.new("testapp.record", id="sig-3"), "agg", in_ms=0)
        run = beat()
        run.tick_alarms(time.time())
        # let the worker answer sig-3 before the test's tables are flushed under it
        wait_for(lambda: Answer.objects.filter(message_id="sig-3").exists(), 10, "the worker to answer sig-3")
    finally:
        for name in names:
            getattr(signals, f"alarm_{name}").disconnect(handlers[name])
        signals.alarm_finished.disconnect(dispatch_uid="broken-receiver")
    assert seen == [
        ("timed_out", "tests", "sig"),
        ("responded", "tests", "sig"),
        ("retried", "tests", "sig"),
        ("responded", "tests", "sig"),
        ("finished", "tests", "sig"),
        ("cancelled", "tests", ("sig-2",)),
        ("published", "tests", "sig-3"),
    ]


@pytest.mark.usefixtures("worker")
def test_a_task_no_worker_knows_reaches_service_responded_as_an_error(beat):
    """Beat does not judge task names (a deploy may have taught workers what beat's process does not
    know); a task no worker knows comes back as an error response, and the application decides."""
    alarms = TestAlarms()
    alarms.dispatch(Message.new("testapp.record", id="renamed"), "agg", in_ms=0)
    # the task was renamed after the alarm was stored: rewrite the row as an older deploy left it
    Alarm.objects.filter(message_id="renamed").update(task_name="testapp.old_name")
    answer = run_beat(beat(), lambda: Answer.objects.filter(message_id="renamed").first(), 15, "the answer")
    assert answer.status == "error"
    assert answer.error == "NotRegistered: no task named 'testapp.old_name' on this worker"
    assert answer.decision == "ok"
    wait_for(lambda: Alarm.objects.filter(message_id="renamed", state=states.FINISHED).exists(), 5, "finished")
    assert AlarmAttempt.objects.get(message_id="renamed").status == "error"


def test_reschedule_dispatch_now_and_restart_change_only_the_states_they_name():
    alarms = TestAlarms()
    alarms.dispatch(Message.new("testapp.record", id="later"), "agg", at=NOW + dt.timedelta(days=1), now=NOW)
    assert alarms.reschedule("later", at=NOW + dt.timedelta(hours=1), now=NOW) is True
    assert Alarm.objects.get(message_id="later").dispatch_at == NOW + dt.timedelta(hours=1)
    assert alarms.dispatch_now("later", now=NOW) is True
    assert Alarm.objects.get(message_id="later").dispatch_at == NOW
    assert alarms.restart("later", now=NOW) is False  # not ended
    ref, message = claimed("later")
    assert alarms.dispatch_now("later", now=NOW) is False  # published: not pending any more
    assert alarms.reschedule("missing", in_ms=5) is False
    with pytest.raises(Exception, match="naive"):
        alarms.reschedule("later", at=dt.datetime(2030, 1, 1))  # noqa: DTZ001 - the bad input under test
    assert ref.attempt == 1 and message.id == "later"


@pytest.mark.parametrize(
    ("overrides", "error_id"),
    [
        ({"CELERY_TASK_SERIALIZER": "pickle"}, "celery_scheduller.E001"),
        ({"CELERY_ACCEPT_CONTENT": ["json", "pickle"]}, "celery_scheduller.E001"),
        ({"CELERY_SCHEDULLER_CLASSES": ["tests.testapp.nope.Missing"]}, "celery_scheduller.E002"),
        ({"CELERY_SCHEDULLER_CLASSES": ["tests.testapp.models.Run"]}, "celery_scheduller.E003"),
        (
            {"CELERY_SCHEDULLER_CLASSES": ["tests.testapp.alarms.TestAlarms", "tests.testapp.alarms.SameNameAlarms"]},
            "celery_scheduller.E004",
        ),
        ({"USE_TZ": False}, "celery_scheduller.W001"),
        ({"CELERY_SCHEDULLER_RESPONSE_BATCH_WAIT": -1}, "celery_scheduller.E005"),
        ({"CELERY_SCHEDULLER_RESPONSE_BATCH_WAIT": 0.5}, "celery_scheduller.E005"),
        ({"CELERY_SCHEDULLER_PUBLISH_AHEAD": -1}, "celery_scheduller.E005"),
        ({"CELERY_SCHEDULLER_PUBLISH_AHEAD": 60_001}, "celery_scheduller.E005"),
        ({"CELERY_SCHEDULLER_PUBLISH_AHEAD": "1000"}, "celery_scheduller.E005"),
    ],
)
def test_system_checks_catch_bad_configuration(overrides, error_id):
    with override_settings(**overrides):
        found = [message.id for message in checks.check_settings()]
    assert found == [error_id]


def test_system_checks_pass_on_the_test_settings():
    assert checks.check_settings() == []


def test_view_only_users_see_alarms_but_cannot_act(client):
    TestAlarms().dispatch(Message.new("testapp.record", id="guarded"), "agg", in_ms=60_000)
    pk = Alarm.objects.get(message_id="guarded").pk
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_alarm"))
    client.force_login(viewer)
    page = client.get("/admin/celery_scheduller/alarm/")
    assert page.status_code == 200 and b"guarded" in page.content
    assert b"Cancel selected alarms" not in page.content
    client.post("/admin/celery_scheduller/alarm/", {"action": "cancel", "_selected_action": [pk], "index": 0})
    assert Alarm.objects.get(pk=pk).state == states.PENDING

    operator = User.objects.create_user("operator", password="pw", is_staff=True)
    operator.user_permissions.add(*Permission.objects.filter(codename__in=["view_alarm", "change_alarm"]))
    client.force_login(operator)
    done = client.post(
        "/admin/celery_scheduller/alarm/", {"action": "cancel", "_selected_action": [pk], "index": 0}, follow=True
    )
    assert b"1 alarm(s) cancelled." in done.content
    assert Alarm.objects.get(pk=pk).state == states.CANCELLED


def test_actions_reach_all_alarms_matching_the_filter(admin_client):
    alarms = TestAlarms()
    alarms.dispatch_many(
        [
            (Message.new("testapp.record", id=f"bulk-{i}"), f"order-{i % 2}", NOW + dt.timedelta(days=1))
            for i in range(30)
        ],
        now=NOW,
    )
    one = Alarm.objects.filter(aggregate_id="order-1").first()
    response = admin_client.post(
        "/admin/celery_scheduller/alarm/?q=order-1",
        {"action": "cancel", "_selected_action": [one.pk], "select_across": "1", "index": 0},
        follow=True,
    )
    assert b"15 alarm(s) cancelled." in response.content
    assert Alarm.objects.filter(aggregate_id="order-1", state=states.CANCELLED).count() == 15
    assert Alarm.objects.filter(aggregate_id="order-0", state=states.PENDING).count() == 15


def test_reschedule_action_asks_for_a_time_then_moves_the_alarms(admin_client):
    alarms = TestAlarms()
    alarms.dispatch(Message.new("testapp.record", id="move-me"), "agg", in_ms=3_600_000)
    pk = Alarm.objects.get(message_id="move-me").pk
    form = admin_client.post(
        "/admin/celery_scheduller/alarm/", {"action": "reschedule", "_selected_action": [pk], "index": 0}
    )
    assert b"Reschedule alarms" in form.content and b"move-me" in form.content
    done = admin_client.post(
        "/admin/celery_scheduller/alarm/",
        {"action": "reschedule", "_selected_action": [pk], "index": 0, "apply": "1", "delay_seconds": "120"},
        follow=True,
    )
    assert b"1 alarm(s) rescheduled to 120 s from now." in done.content
    moved = Alarm.objects.get(pk=pk).dispatch_at - timezone.now()
    assert dt.timedelta(seconds=100) < moved < dt.timedelta(seconds=121)
    bad = admin_client.post(
        "/admin/celery_scheduller/alarm/",
        {"action": "reschedule", "_selected_action": [pk], "index": 0, "apply": "1"},
    )
    assert b"Give either a time or a delay." in bad.content


def test_a_dispatch_timeout_that_fails_on_retry_does_not_strand_the_attempt(monkeypatch):
    alarms = TestAlarms()
    alarms.dispatch(Message.new("testapp.record", id="odd-timeout", assigns={"retries_left": 1}), "a", at=NOW, now=NOW)
    ref, message = claimed("odd-timeout")
    monkeypatch.setattr(TestAlarms, "dispatch_timeout", lambda self, message: 1 / 0)
    assert responses.respond(ref, message, Response("error", error="E"), NOW) == "retried"
    row = Alarm.objects.get(message_id="odd-timeout")
    assert (row.state, row.timeout_ms) == (states.PENDING, 5_000)


def test_cancel_waits_for_a_claim_under_way_and_revokes_what_it_published():
    """A beat publishing ahead claims an alarm while ``cancel`` runs: cancel reads the row locked, so it
    waits for the claim and sees it published (and ahead of its time): the caller then revokes it."""
    import threading

    from django.db import connection as main_connection
    from django.db import transaction as tx

    alarms = TestAlarms()
    due = timezone.now() + dt.timedelta(seconds=30)
    alarms.dispatch(Message.new("testapp.record", id="raced"), "agg", at=due)
    claimed = threading.Event()

    def beat_claims() -> None:
        try:
            with tx.atomic():
                row = Alarm.objects.select_for_update().get(message_id="raced")
                Alarm.objects.filter(pk=row.pk).update(state=states.PUBLISHED, attempt=1, deadline=due)
                claimed.set()
                time.sleep(1.0)  # the claim's transaction is still open while cancel runs
        finally:
            from django.db import connection

            connection.close()

    thread = threading.Thread(target=beat_claims)
    thread.start()
    assert claimed.wait(10)
    started = time.monotonic()
    cancelled, ahead = store.cancel("tests", timezone.now(), True, message_ids=["raced"])
    waited = time.monotonic() - started
    thread.join()
    assert cancelled == ["raced"] and ahead == [("raced", 1, Alarm.objects.get(message_id="raced").pk)]
    assert waited > 0.5 or main_connection.vendor == "sqlite"  # it waited for the claim to commit
    assert Alarm.objects.get(message_id="raced").state == states.CANCELLED
