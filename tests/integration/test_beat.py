"""Beat: windows, late arrivals, restarts, several beats, broker failure, periodic entries."""

from __future__ import annotations

import threading
import time

import pytest
from celery import Celery
from django.conf import settings
from django.db import connection, transaction

from celery_scheduller import Message, states
from celery_scheduller.engine import AlarmEngine
from celery_scheduller.exceptions import PublishFailed
from celery_scheduller.models import Alarm
from tests.conftest import on_schedule, run_beat, wait_for, worker_idle
from tests.testapp.alarms import TestAlarms
from tests.testapp.models import Answer, Run

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker, pytest.mark.usefixtures("worker")]


@pytest.fixture
def short_window():
    """TestAlarms' callbacks with a window of the next 2 s, reloaded every second, for one test."""
    TestAlarms.use_state({"interval_ms": 1000})
    yield TestAlarms()
    TestAlarms.use_state(None)


def test_only_the_window_is_held_and_later_windows_load_on_time(beat, short_window):
    alarms = short_window
    near = alarms.dispatch(Message.new("testapp.record", id="near"), "agg", in_ms=1000)
    far = alarms.dispatch(Message.new("testapp.record", id="far"), "agg", in_ms=4500)
    scheduler = beat()
    scheduler.tick_alarms(time.time())
    engine = scheduler.alarm_engine
    assert "near" in engine.heap and "far" not in engine.heap
    run_beat(scheduler, lambda: "far" in engine.heap, 10, "a later window to load 'far'")
    assert time.time() < far.dispatch_at.timestamp() - 0.5  # loaded ahead of its time, not by the sweep
    run = run_beat(scheduler, lambda: Run.objects.filter(message_id="far").first(), 10, "far to run")
    assert (run.started_at - far.dispatch_at).total_seconds() >= 0
    assert Run.objects.filter(message_id="near").count() == 1
    assert near.dispatch_at < far.dispatch_at
    window = engine.windows["tests"]
    assert window.loaded_until is not None
    assert window.loaded_until - time.time() <= 2.0 + 0.5  # stays 2 × interval ahead, no drift


def test_alarm_saved_by_another_process_inside_the_loaded_window_fires_within_a_second(beat):
    scheduler = beat()
    scheduler.tick_alarms(time.time())
    saved = {}

    def web_request() -> None:
        try:
            with transaction.atomic():
                saved["m"] = TestAlarms().dispatch(Message.new("testapp.record", id="from-web"), "agg", in_ms=700)
        finally:
            connection.close()

    thread = threading.Thread(target=web_request)
    thread.start()
    thread.join()
    assert "from-web" not in scheduler.alarm_engine.heap
    run = run_beat(scheduler, lambda: Run.objects.filter(message_id="from-web").first(), 10, "the run")
    assert (run.started_at - saved["m"].dispatch_at).total_seconds() >= 0


def test_dispatch_rolls_back_and_commits_with_the_callers_transaction(beat):
    alarms = TestAlarms()
    with pytest.raises(RuntimeError), transaction.atomic():
        alarms.dispatch(Message.new("testapp.record", id="rolled-back"), "agg", in_ms=0)
        raise RuntimeError("the order could not be saved")
    with transaction.atomic():
        alarms.dispatch(Message.new("testapp.record", id="committed"), "agg", in_ms=0)
        Run.objects.create(task="caller-data", started_at=Alarm.objects.get().created_at)
    assert list(Alarm.objects.values_list("message_id", flat=True)) == ["committed"]
    run_beat(beat(), lambda: Run.objects.filter(message_id="committed").exists(), 10, "the committed alarm")
    worker_idle(10)
    assert not Run.objects.filter(message_id="rolled-back").exists()


def test_beat_restart_reloads_alarms_and_fires_none_twice(beat):
    alarms = TestAlarms()
    ids = [f"restart-{i}" for i in range(20)]
    for i, message_id in enumerate(ids):
        alarms.dispatch(Message.new("testapp.record", id=message_id), "agg", in_ms=200 + 100 * i)
    first = beat()
    run_beat(first, lambda: Run.objects.filter(message_id__in=ids).count() >= 6, 10, "some alarms to run")
    first.close()  # beat stops; whatever it published stays published, the rest pending
    second = beat()
    run_beat(second, lambda: Answer.objects.filter(message_id__in=ids).count() == 20, 15, "all answers")
    worker_idle(10)  # a duplicate would have run by now
    counts = {m: Run.objects.filter(message_id=m).count() for m in ids}
    assert set(counts.values()) == {1}, counts
    assert not on_schedule(*ids)


def test_two_beats_at_once_publish_each_attempt_once(beat):
    alarms = TestAlarms()
    ids = [f"ha-{i}" for i in range(150)]
    for i, message_id in enumerate(ids):
        alarms.dispatch(Message.new("testapp.record", id=message_id), "agg", in_ms=300 + 5 * i)
    scheduler_a, scheduler_b = beat(), beat()
    done = threading.Event()
    errors: list[BaseException] = []

    def run(scheduler) -> None:
        try:
            while not done.is_set():
                time.sleep(min(scheduler.tick_alarms(time.time()), 0.02))
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(s,)) for s in (scheduler_a, scheduler_b)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: Answer.objects.filter(message_id__in=ids).count() >= 150, 30, "all answers")
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert not errors
    worker_idle(10)
    assert Run.objects.filter(message_id__in=ids).count() == 150
    assert Answer.objects.filter(message_id__in=ids).count() == 150
    assert scheduler_a.alarm_engine.published + scheduler_b.alarm_engine.published == 150


def test_failed_publish_releases_the_claim_and_loses_nothing(beat):
    TestAlarms().dispatch(Message.new("testapp.record", id="broker-down"), "agg", in_ms=0)
    down = Celery("down", broker="redis://127.0.0.1:1/0", set_as_current=False)
    down.conf.broker_connection_retry = False
    down.conf.broker_connection_max_retries = 0
    engine = AlarmEngine(down)
    try:
        with pytest.raises(PublishFailed):
            engine.tick(time.time(), None)
    finally:
        engine.close()
    row = Alarm.objects.get(message_id="broker-down")
    assert row.state == states.PENDING and row.deadline is None
    run_beat(beat(), lambda: Answer.objects.filter(message_id="broker-down").exists(), 10, "delivery")
    assert Run.objects.filter(message_id="broker-down").count() == 1


def test_beat_survives_a_broker_outage_and_delivers_afterwards(beat):
    TestAlarms().dispatch(Message.new("testapp.record", id="after-outage"), "agg", in_ms=0)
    scheduler = beat()
    app = scheduler.app
    scheduler.app = Celery(
        "down", broker="redis://127.0.0.1:1/0", set_as_current=False
    )  # this beat's broker is unreachable
    try:
        delay = scheduler.tick_alarms(time.time())  # logs, pauses: no exception
        assert delay > 0
        assert Alarm.objects.get(message_id="after-outage").state == states.PENDING
    finally:
        scheduler.app = app
        scheduler._drop_broker_connection()
    run_beat(scheduler, lambda: Answer.objects.filter(message_id="after-outage").exists(), 10, "delivery")


def test_beat_keeps_running_the_projects_periodic_entries(beat):
    from tests.celery_app import app

    app.conf.beat_schedule = {"tick": {"task": "testapp.tick", "schedule": 0.3}}
    try:
        scheduler = beat()
        TestAlarms().dispatch(Message.new("testapp.record", id="beside-periodic"), "agg", in_ms=300)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
            Run.objects.filter(task="tick").count() >= 3 and Run.objects.filter(message_id="beside-periodic").exists()
        ):
            time.sleep(min(scheduler.tick(), 0.05))
    finally:
        app.conf.beat_schedule = {}
    assert Run.objects.filter(task="tick").count() >= 3
    assert Run.objects.filter(message_id="beside-periodic").count() == 1


def test_attempt_of_a_dead_beat_times_out_through_another_beat(beat):
    message = Message.new("testapp.sleep", {"seconds": 2.0}, id="orphan", assigns={"timeout_ms": 600})
    TestAlarms().dispatch(message, "agg", in_ms=0)
    first = beat()
    run_beat(first, lambda: Run.objects.filter(message_id="orphan").exists(), 10, "the publish")
    first.close()  # this beat dies with the attempt in flight
    answer = run_beat(beat(), lambda: Answer.objects.filter(message_id="orphan").first(), 10, "the timeout")
    assert answer.status == "timeout"


@pytest.mark.skipif(
    settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"), reason="SQLite has no connection to cut"
)
def test_beat_survives_losing_its_database_connection(beat, caplog):
    scheduler = beat()
    scheduler.tick_alarms(time.time())
    own_id, kill = (
        ("select pg_backend_pid()", "select pg_terminate_backend(%s)")
        if connection.vendor == "postgresql"
        else ("select connection_id()", "kill %s")
    )
    with connection.cursor() as cursor:  # in this thread beat uses the same connection as the test
        cursor.execute(own_id)
        pid = cursor.fetchone()[0]
    TestAlarms().dispatch(Message.new("testapp.record", id="after-db-error"), "agg", in_ms=0)
    from django.db import connections

    other = connections.create_connection("default")
    with other.cursor() as cursor:
        cursor.execute(kill, [pid])
    other.close()
    delay = scheduler.tick_alarms(time.time() + 1.0)  # past the poll interval: beat queries now
    assert delay > 0 and "database error in beat" in caplog.text
    run_beat(
        scheduler, lambda: Run.objects.filter(message_id="after-db-error").exists(), 10, "delivery after reconnect"
    )


def test_a_batch_that_publishes_too_slowly_gives_back_what_would_go_out_half_expired(beat):
    alarms = TestAlarms()
    for i in range(3):
        alarms.dispatch(Message.new("testapp.record", id=f"slow-batch-{i}", assigns={"timeout_ms": 1000}), "a", in_ms=0)
    readings = iter([0.0, 0.6, 0.6, 0.6])  # after the first publish, 600 ms of a 1000 ms timeout are gone
    started = time.time()
    engine = AlarmEngine(beat().app, clock=lambda: started + next(readings, 0.6))
    try:
        engine.tick(started, None)
    finally:
        engine.close()
    rows = dict(Alarm.objects.filter(message_id__startswith="slow-batch-").values_list("message_id", "state"))
    assert sorted(rows.values()).count("pending") == 2  # the third went out (and a worker may have finished it)
    assert engine.published == 1
    run_beat(beat(), lambda: Answer.objects.filter(message_id__startswith="slow-batch-").count() == 3, 10, "all")
    time.sleep(0.3)
    assert Run.objects.filter(message_id__startswith="slow-batch-").count() == 3
