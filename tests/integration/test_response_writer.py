"""The worker's response writer: decisions stored from a thread and a connection of their own, many
``OK`` in one statement, and a worker that does not reconnect to the database for every task."""

from __future__ import annotations

import datetime as dt
import logging
import threading

import pytest
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from celery_scheduller import Message, Response, responses, signals, states, store
from celery_scheduller.message import to_json_value
from celery_scheduller.models import Alarm, AlarmAttempt
from celery_scheduller.writer import ResponseWriter
from tests.conftest import run_beat
from tests.testapp.alarms import FaultAlarms, TestAlarms

pytestmark = pytest.mark.django_db(transaction=True)

postgres_only = pytest.mark.skipif("connection.vendor != 'postgresql'", reason="PostgreSQL paths")


def _published(alarms, service: str, count: int, prefix: str) -> list[tuple[store.AttemptRef, Message]]:
    """``count`` alarms claimed as published, as the worker's hook would find them in the header."""
    past = timezone.now() - dt.timedelta(seconds=1)
    alarms.dispatch_many((Message.new(service, {}, id=f"{prefix}{n}"), "agg", past) for n in range(count))
    rows = store.claim_due([alarms.scheduller_name()], timezone.now(), 10_000)
    return [(store.AttemptRef.of_row(row), store.message_from_row(row)) for row in rows]


def _oks(published: list[tuple[store.AttemptRef, Message]]) -> list[responses.Decided]:
    """What ``service_responded`` decides when each of these attempts answers ``OK`` now."""
    now = timezone.now()
    return [responses.decide(ref, message, Response("ok"), now) for ref, message in published]


@postgres_only
def test_many_oks_are_stored_in_one_statement_and_a_stale_one_is_ignored(settings):
    settings.CELERY_SCHEDULLER_KEEP_FINISHED = None  # the seed's default: a finished alarm leaves the table
    published = _published(TestAlarms(), "testapp.record", 10, "many-")
    decided = _oks(published)
    stale_ref = published[0][0]
    store.finish(stale_ref, Response("ok"), timezone.now(), keep_history=False)  # answered meanwhile
    with CaptureQueriesContext(connection) as queries:
        actions = responses.store_many(decided)
    ours = [q["sql"] for q in queries.captured_queries if "celery_scheduller_alarm" in q["sql"]]
    assert len(ours) == 1, ours
    assert actions == ["ignored"] + ["finished"] * 9
    assert not Alarm.objects.filter(message_id__startswith="many-").exists()


def test_many_retries_are_stored_in_one_statement_with_their_history():
    """Beat's timeouts and a worker's failing tasks: each retry's own message, due time and timeout,
    its attempt on record, ``alarm_retried`` once; on PostgreSQL one statement for them all. A stale
    attempt and a second decision for an alarm already in the batch are ignored."""
    alarms = TestAlarms()
    past = timezone.now() - dt.timedelta(seconds=1)
    assigns = {"retries_left": 1, "retry_ms": 60_000, "retry_timeout_ms": 7_000}
    alarms.dispatch_many(
        (Message.new("testapp.record", {"n": n}, id=f"again-{n}", assigns=assigns), "agg", past) for n in range(10)
    )
    rows = store.claim_due([alarms.scheduller_name()], timezone.now(), 100)
    published = sorted(((store.AttemptRef.of_row(r), store.message_from_row(r)) for r in rows), key=lambda p: p[1].id)
    now = timezone.now()
    decided = [responses.decide(ref, message, Response("timeout"), now) for ref, message in published]
    store.release([published[0][0]], now)  # its attempt is no longer the published one
    decided.append(decided[1])
    retried: list[tuple[str, object]] = []

    def on_retried(sender, message, attempt, dispatch_at, **_):
        retried.append((message.id, dispatch_at))

    signals.alarm_retried.connect(on_retried, weak=False)
    try:
        with CaptureQueriesContext(connection) as queries:
            actions = responses.store_many(decided)
    finally:
        signals.alarm_retried.disconnect(on_retried)
    ours = [q["sql"] for q in queries.captured_queries if "celery_scheduller_alarm" in q["sql"]]
    if connection.vendor == "postgresql":
        assert len(ours) == 2, ours  # the batch, then the second decision alone
    assert actions == ["ignored"] + ["retried"] * 9 + ["ignored"]
    due = now + dt.timedelta(milliseconds=60_000)
    assert sorted(retried) == [(f"again-{n}", due) for n in range(1, 10)]
    for n in range(1, 10):
        alarm = Alarm.objects.get(message_id=f"again-{n}")
        assert (alarm.state, alarm.attempt, alarm.dispatch_at, alarm.timeout_ms, alarm.deadline) == (
            states.PENDING, 1, due, 7_000, None
        )  # fmt: skip
        assert alarm.raw_request == {"n": n, "try": 1}
        assert alarm.assigns == to_json_value(decided[n].again.assigns, "assigns")
        assert (alarm.assigns["retries_left"], alarm.assigns["tries"]) == (0, 1)
        assert alarm.last_response["status"] == "timeout" and alarm.updated_at == now
        (attempt,) = AlarmAttempt.objects.filter(message_id=f"again-{n}")
        ref = published[n][0]
        assert (attempt.attempt, attempt.published_at, attempt.responded_at, attempt.status, attempt.decision) == (
            1, ref.published_at, now, "timeout", "retry in 60000 ms"
        )  # fmt: skip
    stale = Alarm.objects.get(message_id="again-0")
    assert stale.raw_request == {"n": 0} and stale.last_response is None
    assert not AlarmAttempt.objects.filter(message_id="again-0").exists()


def test_the_writer_stores_what_threads_submit_and_signals_each_alarm_once():
    published = _published(TestAlarms(), "testapp.record", 40, "thr-")
    finished: list[str] = []

    def on_finished(sender, message, attempt, **_):
        finished.append(message.id)

    signals.alarm_finished.connect(on_finished, weak=False)
    writer = ResponseWriter()
    try:
        now = timezone.now()

        def submit(part):
            try:
                for ref, message in part:  # TestAlarms' service_responded writes in this thread
                    writer.submit(responses.decide(ref, message, Response("ok"), now))
            finally:
                connection.close()

        threads = [threading.Thread(target=submit, args=(published[n::4],)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert writer.flush(timeout=30)
    finally:
        signals.alarm_finished.disconnect(on_finished)
        assert writer.stop(timeout=30)  # closes the writer's connection: the test database can be dropped
    assert sorted(finished) == sorted(f"thr-{n}" for n in range(40))
    assert Alarm.objects.filter(message_id__startswith="thr-").exclude(state=states.FINISHED).count() == 0


def test_a_stopped_writer_starts_again_on_the_next_submit():
    (ref, message), (ref2, message2) = _published(TestAlarms(), "testapp.record", 2, "again-")
    writer = ResponseWriter()
    writer.submit(responses.decide(ref, message, Response("ok"), timezone.now()))
    assert writer.stop(timeout=30)
    writer.submit(responses.decide(ref2, message2, Response("ok"), timezone.now()))
    assert writer.stop(timeout=30)
    assert Alarm.objects.filter(message_id__startswith="again-", state=states.FINISHED).count() == 2


def _sessions() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        return int(cursor.fetchone()[0])


@postgres_only
@pytest.mark.worker
@pytest.mark.usefixtures("worker")
def test_the_worker_does_not_reconnect_to_the_database_for_every_task(beat):
    """Celery's Django fixup closes a task's connections around every task; the hook's writes go through
    the writer's connection, which it leaves alone. 60 tasks that touch no database themselves, on 3 pool
    processes: a reconnect per task would open 60 sessions."""
    scheduler = beat()
    before = _sessions()
    _published_now = timezone.now() - dt.timedelta(seconds=1)
    FaultAlarms().dispatch_many(
        (Message.new("testapp.noop", {}, id=f"conn-{n}"), "agg", _published_now) for n in range(60)
    )
    run_beat(
        scheduler,
        lambda: not Alarm.objects.filter(message_id__startswith="conn-").exclude(state=states.FINISHED).exists(),
        30,
        "every alarm to be answered",
    )
    opened = _sessions() - before
    assert opened < 20, f"{opened} database sessions opened for 60 tasks"


def test_responses_that_come_within_the_batch_wait_are_stored_together(settings, monkeypatch):
    settings.CELERY_SCHEDULLER_RESPONSE_BATCH_WAIT = 300
    published = _published(TestAlarms(), "testapp.record", 10, "wait-")
    decided = _oks(published)
    calls: list[int] = []
    store_many = responses.store_many

    def counted(decisions):
        calls.append(len(decisions))
        return store_many(decisions)

    monkeypatch.setattr(responses, "store_many", counted)
    _store_through_a_writer(decided)
    assert calls == [10]
    assert Alarm.objects.filter(message_id__startswith="wait-", state=states.FINISHED).count() == 10


@postgres_only
def test_the_writer_stores_while_celery_closes_the_connection_pool(monkeypatch, caplog):
    """With Django's connection pool (``OPTIONS["pool"]``), Celery's Django fixup closes the process's
    pool around every task in a prefork child: ``close_pool`` closes the pool, then unregisters it. A
    writer that connected through the pool in between got ``PoolClosed`` on both tries and lost its
    batch (seen in CI as a reminder sent twice). Here the pool is held in that state while the writer
    connects."""
    published = _published(TestAlarms(), "testapp.record", 5, "pool-")
    decided = _oks(published)
    shared = connections.settings[DEFAULT_DB_ALIAS]  # the settings every thread's connection is made from
    monkeypatch.setitem(shared, "OPTIONS", {**shared["OPTIONS"], "pool": {"min_size": 1, "max_size": 2}})
    monkeypatch.setitem(shared, "CONN_MAX_AGE", 0)
    closing = connections[DEFAULT_DB_ALIAS].pool
    closing.open()  # a pool the process's tasks have used
    closing.close()  # what close_pool does first; the pool stays registered until it returns
    caplog.set_level(logging.ERROR, logger="celery_scheduller")
    try:
        _store_through_a_writer(decided)
    finally:
        connections[DEFAULT_DB_ALIAS]._connection_pools.pop(DEFAULT_DB_ALIAS, None)  # as close_pool ends
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
    assert Alarm.objects.filter(message_id__startswith="pool-", state=states.FINISHED).count() == 5


def _store_through_a_writer(decided: list[responses.Decided]) -> None:
    """Submit every decision to a writer of its own, wait until they are stored, stop it."""
    writer = ResponseWriter()
    try:
        for one in decided:
            writer.submit(one)
        assert writer.flush(timeout=30)
    finally:
        assert writer.stop(timeout=30)  # closes the writer's connection: the test database can be dropped
