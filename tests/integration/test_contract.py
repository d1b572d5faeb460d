"""The contract as a Celery user reads it: giving up is visible (``Fail``), the response timeout is a setting
with a check beside tasks' time limits, configuration errors stop beat and workers at start, an aggregate's
alarms can be read, and the beat scheduler answers to the one-l spelling too."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone

from celery_scheduller import Fail, InvalidAlarm, InvalidResponse, Message, checks, states
from celery_scheduller.models import Alarm, AlarmAttempt
from celery_scheduller.scheduller import validate_decision
from tests.conftest import run_beat, wait_for
from tests.testapp.alarms import TestAlarms
from tests.testapp.models import Answer, Run

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]


# -- Fail ---------------------------------------------------------------------------------------------------


def test_fail_needs_a_reason_and_is_a_valid_answer():
    message = Message.new("testapp.record", id="m")
    assert validate_decision(Fail("card declined"), message) == Fail("card declined")
    for bad in ("", "  ", None, 3):
        with pytest.raises(InvalidAlarm, match=r"Fail\.reason"):
            Fail(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidResponse, match=r"OK, Retry\(in_ms, message\) or Fail\(reason\)"):
        validate_decision("nope", message)


@pytest.mark.worker
@pytest.mark.usefixtures("worker")
def test_giving_up_with_fail_ends_the_alarm_failed_and_visible_everywhere(beat, admin_client):
    """A real worker runs the task twice (one retry), then ``service_responded`` gives up: the alarm is
    ``failed`` with the reason beside the task's own response, kept although KEEP_FINISHED is None, in the
    admin's failed view, in ``scheduller_status``, sent with ``alarm_failed``, and restartable."""
    with override_settings(CELERY_SCHEDULLER_KEEP_FINISHED=None):
        assigns = {"retries_left": 1, "fail_reason": "the customer's card was declined twice"}
        TestAlarms().dispatch(Message.new("testapp.record", id="give-up", assigns=assigns), "order-7", in_ms=0)
        run_beat(
            beat(),
            lambda: Alarm.objects.filter(message_id="give-up", state=states.FAILED).exists(),
            20,
            "the alarm to be given up",
        )
    row = Alarm.objects.get(message_id="give-up")
    assert row.attempt == 2 and row.finished_at is not None
    assert row.last_response["status"] == "ok" and row.last_response["reason"] == assigns["fail_reason"]
    assert list(Answer.objects.filter(message_id="give-up").values_list("decision", flat=True)) == ["retry 100", "fail"]
    history = list(
        AlarmAttempt.objects.filter(message_id="give-up").order_by("attempt").values_list("status", "decision")
    )
    assert history[-1] == ("ok", "failed: the customer's card was declined twice")
    # the signal, sent in the worker that stored the decision (testapp records it)
    failed = wait_for(
        lambda: [r for r in Run.objects.filter(task="alarm_failed") if r.kwargs["alarm"] == "give-up"],
        10,
        "alarm_failed",
    )
    assert [(r.kwargs["sender"], r.kwargs["attempt"], r.kwargs["reason"]) for r in failed] == [
        ("tests", 2, assigns["fail_reason"])
    ]
    page = admin_client.get("/admin/celery_scheduller/alarm/?status=failed").content.decode()
    assert "give-up" in page and "failed: the customer&#x27;s card was declined twice" in page
    report = json.loads(_command_output("scheduller_status", "--json", "--max-overdue", "3600"))
    assert report["schedullers"]["tests"]["counts"]["failed"] == 1
    assert TestAlarms().restart("give-up")
    assert Alarm.objects.get(message_id="give-up").state == states.PENDING


# -- DISPATCH_TIMEOUT and W003 --------------------------------------------------------------------------------


def test_dispatch_timeout_is_a_setting_and_the_method_still_wins():
    from celery_scheduller import Scheduller

    class Plain(Scheduller):
        name = "plain-timeout"

        def service_responded(self, message: Message) -> object:
            raise NotImplementedError

    message = Message.new("testapp.record")
    assert Plain().dispatch_timeout(message) == 5_000  # the seed's default
    with override_settings(CELERY_SCHEDULLER_DISPATCH_TIMEOUT=30_000):
        assert Plain().dispatch_timeout(message) == 30_000
        assert TestAlarms().dispatch_timeout(message) == 5_000  # overridden per class
    with override_settings(CELERY_SCHEDULLER_DISPATCH_TIMEOUT=0):
        errors = checks.errors_at_start()
        assert any("celery_scheduller.E005" in e and "DISPATCH_TIMEOUT" in e for e in errors)


def test_a_task_whose_time_limit_is_longer_than_dispatch_timeout_is_warned_of():
    from celery_scheduller import Scheduller
    from tests.celery_app import app

    class Plain(Scheduller):
        name = "plain-w003"

        def service_responded(self, message: Message) -> object:
            raise NotImplementedError

    def slow_report() -> None:
        """A task that may run 30 s."""

    app.task(name="tests.slow_report", time_limit=30, soft_time_limit=20, shared=False)(slow_report)
    assert app.tasks["tests.slow_report"].time_limit == 30
    paths = ["tests.testapp.alarms.TestAlarms", f"{__name__}.PlainForCheck"]
    globals()["PlainForCheck"] = Plain
    try:
        with override_settings(CELERY_SCHEDULLER_CLASSES=paths):
            found = [m for m in checks.check_settings() if m.id == "celery_scheduller.W003"]
            assert len(found) == 1
            assert "'tests.slow_report' may run longer (time_limit=30 s, soft_time_limit=20 s)" in found[0].msg
            assert "DISPATCH_TIMEOUT (5 s)" in found[0].msg
            with override_settings(CELERY_SCHEDULLER_DISPATCH_TIMEOUT=60_000):
                assert not [m for m in checks.check_settings() if m.id == "celery_scheduller.W003"]
        # every Scheduller served sets its own dispatch_timeout: nothing to warn of
        with override_settings(CELERY_SCHEDULLER_CLASSES=["tests.testapp.alarms.TestAlarms"]):
            assert not [m for m in checks.check_settings() if m.id == "celery_scheduller.W003"]
    finally:
        app.tasks.pop("tests.slow_report", None)
        globals().pop("PlainForCheck", None)


# -- configuration errors stop beat and workers -----------------------------------------------------------


def _celery(*argv: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.celery_app", *argv],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_configuration_error_stops_beat_and_the_worker_at_start_with_the_checks_message(tmp_path):
    expected = (
        "celery_scheduller.E005: CELERY_SCHEDULLER_BATCH_SIZE must be an integer of alarms from 1 to 100,000, got 0"
    )
    beat = _celery(
        "beat", "-S", "celery_scheduller", "--pidfile=", "-s", str(tmp_path / "s"), env={"CSCHED_BATCH_SIZE": "0"}
    )
    assert beat.returncode == 1
    assert f"celery_scheduller: beat not started: {expected}" in beat.stderr.splitlines()
    assert "Traceback" not in beat.stderr
    worker = _celery(
        "worker", "-P", "solo", "-Q", f"{os.environ.get('CSCHED_QUEUE', 'celery')}.none", env={"CSCHED_BATCH_SIZE": "0"}
    )
    assert worker.returncode == 1
    assert f"celery_scheduller: worker not started: {expected}" in worker.stderr.splitlines()
    assert "Traceback" not in worker.stderr


def test_beat_answers_to_the_one_l_spelling(tmp_path):
    log = tmp_path / "beat.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.celery_app",
            "beat",
            "-S",
            "celery_scheduler",
            "-l",
            "info",
            "-f",
            str(log),
            "--pidfile=",
            "-s",
            str(tmp_path / "s"),
        ],
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and "beat: Starting" in log.read_text()):
            assert proc.poll() is None, "beat exited"
            assert time.monotonic() < deadline, "beat did not start"
            time.sleep(0.2)
        assert "celery_scheduller.schedulers.AlarmScheduler" in log.read_text() or proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)


# -- reading an aggregate's alarms ----------------------------------------------------------------------------


@pytest.mark.usefixtures("close_sync_thread_connections")
def test_pending_lists_this_schedullers_alarms_of_an_aggregate_soonest_first():
    from tests.testapp.alarms import FaultAlarms

    now = timezone.now()
    alarms = TestAlarms()
    alarms.dispatch(
        Message.new("testapp.record", id="later", assigns={"k": 1}), "order-1", at=now + dt.timedelta(hours=2)
    )
    alarms.dispatch(Message.new("testapp.record", id="sooner"), "order-1", at=now + dt.timedelta(hours=1))
    alarms.dispatch(Message.new("testapp.record", id="gone"), "order-1", in_ms=60_000)
    alarms.dispatch(Message.new("testapp.record", id="other-order"), "order-2", in_ms=60_000)
    FaultAlarms().dispatch(Message.new("testapp.record", id="other-scheduller"), "order-1", in_ms=60_000)
    alarms.cancel("gone")
    found = alarms.pending("order-1")
    assert [m.id for m in found] == ["sooner", "later"]
    assert found[1].assigns["k"] == 1 and found[1].assigns["dispatch_at"] == now + dt.timedelta(hours=2)
    assert alarms.pending("nobody") == []
    import asyncio

    assert [m.id for m in asyncio.run(alarms.apending("order-1"))] == ["sooner", "later"]
    assert alarms.cancel_aggregate("order-1") == 2  # this Scheduller's only
    assert [m.id for m in FaultAlarms().pending("order-1")] == ["other-scheduller"]


def _command_output(*argv: str) -> str:
    from io import StringIO

    out = StringIO()
    call_command(*argv, stdout=out)
    return out.getvalue()


# -- dispatch of an id already scheduled -------------------------------------------------------------------


@pytest.mark.usefixtures("close_sync_thread_connections")
def test_dispatch_returns_what_is_stored_and_dispatch_or_get_says_whether_it_was_new():
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    alarms = TestAlarms()
    first_at = timezone.now() + dt.timedelta(hours=1)
    with CaptureQueriesContext(connection) as new_queries:
        stored, created = alarms.dispatch_or_get(
            Message.new("testapp.record", {"n": 1}, id="once", assigns={"k": "first"}), "agg", at=first_at
        )
    assert created is True and stored.dispatch_at == first_at and stored.assigns["k"] == "first"
    again = Message.new("testapp.record", {"n": 2}, id="once", assigns={"k": "second"})
    with CaptureQueriesContext(connection) as duplicate_queries:
        kept, created = alarms.dispatch_or_get(again, "agg", in_ms=5_000)
    assert created is False
    assert (kept.dispatch_at, kept.raw_request, kept.assigns["k"]) == (first_at, {"n": 1}, "first")
    returned = alarms.dispatch(again, "agg", in_ms=5_000)  # what the tutorial's view reports
    assert returned.dispatch_at == first_at and returned == kept
    assert Alarm.objects.get(message_id="once").dispatch_at == first_at
    if connection.vendor == "postgresql":  # one statement for a new alarm, one more to read a duplicate
        inserts = [q for q in new_queries.captured_queries if "INSERT" in q["sql"]]
        assert len(inserts) == 1
        assert len(duplicate_queries.captured_queries) == len(new_queries.captured_queries) + 1
    import asyncio

    _, created = asyncio.run(alarms.adispatch_or_get(again, "agg", in_ms=5_000))
    assert created is False
