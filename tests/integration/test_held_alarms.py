"""Alarms published ahead of their time and held by a worker until then: ``cancel`` and ``reschedule`` keep
their meaning (whether or not the revoke reaches the worker: its guard reads the alarm when the task comes
due), and a worker that dies holding them loses none. On the session's broker (Redis or RabbitMQ in CI)."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from django.db import connection, transaction
from django.test import override_settings

from celery_scheduller import Message, states, store
from celery_scheduller.models import Alarm
from celery_scheduller.scheduller import _now
from celery_scheduller.wire import QUEUE_KEY
from tests.conftest import on_schedule, run_beat, start_worker, stop, wait_for, worker_idle
from tests.testapp.alarms import TestAlarms
from tests.testapp.models import Answer, Run

pytestmark = pytest.mark.django_db(transaction=True)

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)


def test_reschedule_moves_an_alarm_published_ahead_until_the_handover_and_names_the_attempt_to_revoke():
    alarms = TestAlarms()
    for message_id, in_ms in (("far", 900), ("near", states.HANDOVER_MS - 1), ("waiting", 60_000)):
        alarms.dispatch(Message.new("testapp.record", id=message_id), "agg", at=NOW + dt.timedelta(milliseconds=in_ms))
    store.claim_due(["tests"], NOW, 100, until=NOW + dt.timedelta(seconds=1))  # "far" and "near" published ahead
    later = NOW + dt.timedelta(minutes=5)

    far_pk = Alarm.objects.get(message_id="far").pk
    assert store.reschedule("tests", "far", later, NOW) == (True, ("far", 1, far_pk))
    assert store.reschedule("tests", "near", later, NOW) == (False, None)  # within the handover: it runs as it is
    assert store.reschedule("tests", "waiting", later, NOW) == (True, None)  # pending: nothing held

    far = Alarm.objects.get(message_id="far")
    assert (far.state, far.dispatch_at, far.deadline, far.published_at) == (states.PENDING, later, None, None)
    assert Alarm.objects.get(message_id="near").state == states.PUBLISHED
    claimed = {row["message_id"]: row["attempt"] for row in store.claim_due(["tests"], later, 100)}
    assert claimed == {"far": 2, "waiting": 1}  # "far"'s next publish is a new attempt: a task id of its own


def _held_by_workers(count: int) -> bool:
    """Whether the workers hold ``count`` tasks for their eta."""
    from tests.celery_app import app

    held = app.control.inspect(timeout=0.5).scheduled() or {}
    return sum(len(tasks) for tasks in held.values()) >= count


def _no_revoke(monkeypatch: pytest.MonkeyPatch) -> None:
    """The revoke never reaches a worker (a broker hiccup, a worker restarted since): only the guard is left."""
    import celery_scheduller.scheduller as module

    monkeypatch.setattr(module, "_revoke", lambda attempts: None)


def _runs(message_id: str) -> int:
    return Run.objects.filter(message_id=message_id).count()


@pytest.mark.worker
@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("revoke", ["revoked", "not revoked"])
@override_settings(CELERY_SCHEDULLER_PUBLISH_AHEAD=3_000)
def test_a_cancelled_alarm_held_by_a_worker_does_not_run(beat, monkeypatch, revoke):
    if revoke == "not revoked":
        _no_revoke(monkeypatch)
    alarms = TestAlarms()
    scheduler = beat()
    scheduler.tick_alarms(time.time())
    for message_id in ("kept", "cancelled"):
        alarms.dispatch(Message.new("testapp.record", id=message_id), "agg", in_ms=2_000)
    published = Alarm.objects.filter(message_id__in=["kept", "cancelled"], state=states.PUBLISHED)
    run_beat(scheduler, lambda: published.count() == 2, 5, "both to be published ahead")
    wait_for(lambda: _held_by_workers(2), 10, "the worker to hold both until their eta")

    assert alarms.cancel("cancelled") is True

    run_beat(scheduler, lambda: _runs("kept") == 1, 10, "the kept alarm to run")
    worker_idle(10)  # the cancelled one, due at the same time, would have run by the time the worker is idle
    assert _runs("cancelled") == 0
    assert not on_schedule("cancelled")
    assert not Answer.objects.filter(message_id="cancelled").exists()


@pytest.mark.worker
@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("revoke", ["revoked", "not revoked"])
@override_settings(CELERY_SCHEDULLER_PUBLISH_AHEAD=3_000)
def test_a_rescheduled_alarm_held_by_a_worker_runs_once_at_its_new_time(beat, monkeypatch, revoke):
    if revoke == "not revoked":
        _no_revoke(monkeypatch)
    alarms = TestAlarms()
    scheduler = beat()
    scheduler.tick_alarms(time.time())
    alarms.dispatch(Message.new("testapp.record", id="later"), "agg", in_ms=1_500)
    alarms.dispatch(Message.new("testapp.record", id="sooner"), "agg", in_ms=2_500)
    published = Alarm.objects.filter(message_id__in=["later", "sooner"], state=states.PUBLISHED)
    run_beat(scheduler, lambda: published.count() == 2, 5, "both to be published ahead")
    wait_for(lambda: _held_by_workers(2), 10, "the worker to hold both until their eta")
    old_due = {a.message_id: a.dispatch_at for a in published}

    assert alarms.reschedule("later", in_ms=4_000) is True  # past its old time: the held task must not run then
    assert alarms.dispatch_now("sooner") is True  # before its old time: runs now, and not again at that time
    new_due = {a.message_id: a.dispatch_at for a in Alarm.objects.filter(message_id__in=["later", "sooner"])}

    run_beat(scheduler, lambda: _runs("sooner") == 1, 10, "the alarm made due now to run")
    assert Run.objects.get(message_id="sooner").started_at < old_due["sooner"]
    run_beat(scheduler, lambda: _runs("later") == 1, 15, "the alarm moved later to run")
    started = Run.objects.get(message_id="later").started_at
    assert started >= new_due["later"] - dt.timedelta(milliseconds=50), (started, new_due["later"])
    assert started > old_due["later"] + dt.timedelta(seconds=1)
    run_beat(scheduler, lambda: not on_schedule("later") and not on_schedule("sooner"), 10, "both to finish")
    worker_idle(10)
    time.sleep(max(0.0, (old_due["sooner"] - _now()).total_seconds()) + 0.3)  # past every old due time
    worker_idle(10)
    assert (_runs("later"), _runs("sooner")) == (1, 1)  # each ran once, at its new time
    for message_id in ("later", "sooner"):
        alarm = Alarm.objects.get(message_id=message_id)
        assert (alarm.state, alarm.attempt) == (states.FINISHED, 2)  # the held attempt 1 never answered
        assert [a.decision for a in Answer.objects.filter(message_id=message_id)] == ["ok"]


@pytest.mark.worker
@pytest.mark.usefixtures("worker")
@override_settings(CELERY_SCHEDULLER_PUBLISH_AHEAD=2_000)
def test_a_cancel_not_yet_committed_when_the_alarm_comes_due_is_waited_for(beat, monkeypatch):
    if connection.vendor == "sqlite":
        pytest.skip("SQLite has no row locks: a worker reads what was last committed")
    _no_revoke(monkeypatch)
    alarms = TestAlarms()
    scheduler = beat()
    scheduler.tick_alarms(time.time())
    alarms.dispatch(Message.new("testapp.record", id="slow-cancel"), "agg", in_ms=1_000)
    alarms.dispatch(Message.new("testapp.record", id="slow-rollback"), "agg", in_ms=1_000)
    published = Alarm.objects.filter(message_id__in=["slow-cancel", "slow-rollback"], state=states.PUBLISHED)
    run_beat(scheduler, lambda: published.count() == 2, 5, "both to be published ahead")
    due = published.first().dispatch_at  # type: ignore[union-attr]
    wait_for(lambda: _held_by_workers(2), 10, "the worker to hold both until their eta")

    class RolledBack(Exception):
        pass

    def rolled_back_cancel() -> None:  # another connection: a view whose transaction fails after the cancel
        try:
            with transaction.atomic():
                assert alarms.cancel("slow-rollback") is True
                time.sleep(max(0.0, (due - _now()).total_seconds()) + 0.5)
                raise RolledBack
        except RolledBack:
            pass
        finally:
            connection.close()

    other = threading.Thread(target=rolled_back_cancel)
    other.start()
    with transaction.atomic():
        assert alarms.cancel("slow-cancel") is True
        time.sleep(max(0.0, (due - _now()).total_seconds()) + 0.5)  # past its time, the cancel not yet committed
        assert _runs("slow-cancel") == 0
    other.join()

    run_beat(scheduler, lambda: _runs("slow-rollback") == 1, 10, "the alarm whose cancel rolled back to run")
    worker_idle(10)
    assert _runs("slow-cancel") == 0  # the worker waited for the cancel, and dropped it


@pytest.fixture
def two_workers(settings, tmp_path: Path):
    """Two workers on a queue of their own (prefork, 2 processes each); yields the queue and the processes."""
    queue = f"{settings.CSCHED_TEST_QUEUE}.held"
    procs = []
    try:
        for name in ("a", "b"):
            procs.append(
                start_worker(
                    tmp_path / f"worker-{name}.log",
                    "-c",
                    "2",
                    "-Q",
                    queue,
                    "-n",
                    f"csched-held-{name}-{os.getpid()}@%h",
                )
            )
        yield queue, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                stop(proc)


def _held_by(worker_name: str) -> list[str]:
    """The alarm ids the named worker holds for their eta."""
    from tests.celery_app import app

    held = app.control.inspect(timeout=0.5, destination=[worker_name]).scheduled() or {}
    return [entry["request"]["id"].rsplit("#", 1)[0] for entries in held.values() for entry in entries]


@pytest.mark.worker
@override_settings(CELERY_SCHEDULLER_PUBLISH_AHEAD=4_000)
def test_a_worker_killed_holding_alarms_published_ahead_loses_none(beat, two_workers):
    """Killed while it holds alarms: each still runs once, by the other worker (a broker that redelivers,
    RabbitMQ) or as the retry of the attempt beat answers as lost at its deadline (Redis keeps an unacked task
    for its visibility timeout); one cancelled after the kill does not run even where it is redelivered."""
    queue, (worker_a, worker_b) = two_workers
    alarms = TestAlarms()
    scheduler = beat()
    scheduler.tick_alarms(time.time())
    assigns = {QUEUE_KEY: queue, "timeout_ms": 1_500, "retries_left": 1, "retry_ms": 0, "retry_errors_only": True}
    ids = [f"held-{n}" for n in range(6)]
    for message_id in ids:
        alarms.dispatch(Message.new("testapp.record", id=message_id, assigns=assigns), "agg", in_ms=3_000)
    published = Alarm.objects.filter(message_id__in=ids, state=states.PUBLISHED)
    run_beat(scheduler, lambda: published.count() == len(ids), 5, "all to be published ahead")
    name_a = f"csched-held-a-{os.getpid()}@{_hostname()}"
    name_b = f"csched-held-b-{os.getpid()}@{_hostname()}"
    wait_for(lambda: len(_held_by(name_a)) + len(_held_by(name_b)) == len(ids), 10, "the workers to hold all")
    held_a = _held_by(name_a)
    if not held_a:  # the broker gave worker b all of them: the roles swap
        held_a, (worker_a, worker_b) = _held_by(name_b), (worker_b, worker_a)

    subprocess.run(["pkill", "-KILL", "-P", str(worker_a.pid)], check=False)  # its pool processes, then itself
    worker_a.send_signal(signal.SIGKILL)
    worker_a.wait(10)
    cancelled = held_a[0]
    assert alarms.cancel(cancelled) is True

    ran = [message_id for message_id in ids if message_id != cancelled]
    run_beat(
        scheduler,
        lambda: Alarm.objects.filter(message_id__in=ran, state=states.FINISHED).count() == len(ran),
        30,
        "every alarm but the cancelled one to finish",
    )
    worker_idle(10)
    time.sleep(1)
    assert {message_id: _runs(message_id) for message_id in ids} == {m: int(m != cancelled) for m in ids}
    lost = Answer.objects.filter(message_id__in=held_a, status="timeout").values_list("message_id", flat=True)
    assert set(lost) <= set(held_a)  # answered as lost only what the killed worker held
    assert worker_b.poll() is None


def _hostname() -> str:
    import socket

    return socket.gethostname()
