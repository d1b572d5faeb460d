"""The fast paths of issue 5: announced late arrivals, back-to-back claims, one-round-trip responses."""

from __future__ import annotations

import datetime as dt
import select
import threading
import time

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from celery_scheduller import Message, Response, notify, states, store
from celery_scheduller.models import Alarm, AlarmAttempt
from celery_scheduller.responses import respond
from celery_scheduller.store import postgres
from tests.bulk import fill
from tests.conftest import run_beat, wait_for
from tests.testapp.alarms import FaultAlarms, TestAlarms
from tests.testapp.models import Run

pytestmark = pytest.mark.django_db(transaction=True)

postgres_only = pytest.mark.skipif("connection.vendor != 'postgresql'", reason="PostgreSQL paths")


@postgres_only
@pytest.mark.worker
@pytest.mark.usefixtures("worker")
def test_an_alarm_dispatched_into_a_loaded_window_is_announced_and_fires_on_time_without_a_poll(beat, settings):
    settings.CELERY_SCHEDULLER_POLL_INTERVAL = 60_000  # the poll would find it a minute late
    scheduler = beat()
    scheduler.tick_alarms(time.time())  # loads the (empty) window and takes the poll of the first tick
    saved = {}

    def web_request() -> None:
        try:
            with transaction.atomic():
                saved["m"] = TestAlarms().dispatch(Message.new("testapp.record", id="announced"), "agg", in_ms=600)
        finally:
            connection.close()

    thread = threading.Thread(target=web_request)
    thread.start()
    thread.join()
    run = run_beat(scheduler, lambda: Run.objects.filter(message_id="announced").first(), 10, "the run")
    lateness = (run.started_at - saved["m"].dispatch_at).total_seconds()
    assert 0 <= lateness < 6.0, lateness  # woken by the announcement: the poll would be 60 s late
    assert scheduler.alarm_engine.next_poll_at > time.time() + 50  # no poll ran meanwhile


def _announcement_arrived(engine) -> None:
    """Wait until beat's LISTEN connection has an announcement to read (it connected at the first tick)."""
    conn = engine.listener._conn
    assert conn is not None, "beat is not listening"
    readable, _, _ = select.select([conn.fileno()], [], [], 10)
    assert readable, "no announcement reached beat's LISTEN connection within 10 s"


@postgres_only
def test_a_narrow_announcement_is_held_without_reading_the_table_and_a_wide_one_is_read(beat, settings):
    """A ``dispatch`` announces one due time: beat holds it as is. A ``dispatch_many`` whose due times
    span more than a claim gap announces a range: beat reads the ids in it."""
    settings.CELERY_SCHEDULLER_POLL_INTERVAL = 60_000
    scheduler = beat()
    engine = scheduler.alarm_engine
    scheduler.tick_alarms(time.time())  # loads the (empty) window
    names = engine._names()
    one = TestAlarms().dispatch(Message.new("testapp.record", id="narrow"), "agg", in_ms=30_000)
    _announcement_arrived(engine)
    with CaptureQueriesContext(connection) as queries:
        engine._hold_announced(names)
    assert [query["sql"] for query in queries] == []
    due = one.dispatch_at.timestamp()
    assert f"announced {due!r}" in engine.heap and engine.heap.next_due() == due
    now = dt.datetime.now(dt.UTC)
    TestAlarms().dispatch_many(
        [(Message.new("testapp.record", id=f"wide-{n}"), "agg", now + dt.timedelta(seconds=20 + n)) for n in range(3)]
    )
    _announcement_arrived(engine)
    with CaptureQueriesContext(connection) as queries:
        engine._hold_announced(names)
    assert len(queries) == 1
    assert {"wide-0", "wide-1", "wide-2"} <= {alarm_id for alarm_id in engine.heap._held}


@postgres_only
def test_a_rolled_back_dispatch_announces_nothing(beat, settings):
    settings.CELERY_SCHEDULLER_POLL_INTERVAL = 60_000
    scheduler = beat()
    scheduler.tick_alarms(time.time())
    with pytest.raises(RuntimeError), transaction.atomic():
        TestAlarms().dispatch(Message.new("testapp.record", id="rolled-back"), "agg", in_ms=100)
        raise RuntimeError("the caller's transaction fails")
    # NOTIFYs arrive in commit order: once a later, committed one is in, a rolled-back one would be too
    notify.announce("a-scheduller-nobody-serves", dt.datetime.now(dt.UTC), dt.datetime.now(dt.UTC))
    _announcement_arrived(scheduler.alarm_engine)
    scheduler.tick_alarms(time.time())
    assert len(scheduler.alarm_engine.heap) == 0
    assert not Alarm.objects.filter(message_id="rolled-back").exists()


def test_a_full_batch_is_followed_by_the_next_claim_at_once_not_by_the_poll(beat, settings):
    settings.CELERY_SCHEDULLER_POLL_INTERVAL = 60_000
    settings.CELERY_SCHEDULLER_BATCH_SIZE = 5
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    TestAlarms().dispatch_many([(Message.new("testapp.record", id=f"backlog-{n}"), "agg", past) for n in range(23)])
    scheduler = beat()
    delays = []
    started = time.monotonic()
    while scheduler.alarm_engine.published < 23 and time.monotonic() - started < 5:
        delays.append(scheduler.tick_alarms(time.time()))
    assert scheduler.alarm_engine.published == 23
    assert delays[:4] == [0.0, 0.0, 0.0, 0.0]  # four full batches, each followed at once
    assert not Alarm.objects.filter(message_id__startswith="backlog-", state=states.PENDING).exists()


def test_a_fast_stream_of_due_times_is_claimed_in_batches_of_about_ten(beat, settings):
    """2,000 alarms a second held in the window: after the first claim (20 ms apart, as a slow stream),
    beat claims every 5 ms, about ten at a time. The ticks are given their time (no due time falls on
    one), so it is exact."""
    settings.CELERY_SCHEDULLER_POLL_INTERVAL = 60_000
    base = time.time() + 2
    due = [dt.datetime.fromtimestamp(base - 0.00025 + n / 2000, dt.UTC) for n in range(100)]
    TestAlarms().dispatch_many((Message.new("testapp.stale", id=f"stream-{n}"), "agg", due[n]) for n in range(100))
    scheduler = beat()
    scheduler.tick_alarms(base - 1)  # loads the window; nothing due yet
    assert len(scheduler.alarm_engine.heap) == 100
    claimed, now = [], base
    for _ in range(4):
        before = scheduler.alarm_engine.published
        delay = scheduler.tick_alarms(now)
        claimed.append((scheduler.alarm_engine.published - before, round(delay, 4)))
        now += delay
    assert claimed == [(1, 0.02), (40, 0.005), (10, 0.005), (10, 0.005)]


def _ours(queries: CaptureQueriesContext) -> list[str]:
    """The statements on the package's tables (TestAlarms.service_responded writes rows of its own)."""
    return [query["sql"] for query in queries.captured_queries if "celery_scheduller_" in query["sql"]]


def _published_attempt(message_id: str) -> tuple[store.AttemptRef, Message]:
    TestAlarms().dispatch(Message.new("testapp.record", id=message_id), "agg", in_ms=0)
    rows = store.claim_due(["tests"], dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1), 10)
    row = next(row for row in rows if row["message_id"] == message_id)
    return store.AttemptRef.of_row(row), store.message_from_row(row)


@postgres_only
@pytest.mark.parametrize("keep", [None, 3600], ids=["removed", "kept"])
def test_the_response_of_a_task_costs_one_database_round_trip(settings, keep):
    settings.CELERY_SCHEDULLER_KEEP_FINISHED = keep
    ref, message = _published_attempt(f"one-trip-{keep}")
    with CaptureQueriesContext(connection) as queries:
        assert respond(ref, message, Response("ok", value=1), dt.datetime.now(dt.UTC)) == "finished"
    assert len(_ours(queries)) == 1, _ours(queries)  # besides TestAlarms' own Answer row
    if keep:
        assert Alarm.objects.get(message_id=message.id).state == states.FINISHED
        assert AlarmAttempt.objects.filter(message_id=message.id, status="ok").count() == 1
    else:
        assert not Alarm.objects.filter(message_id=message.id).exists()


@postgres_only
def test_a_retry_is_one_round_trip_too_and_keeps_its_attempt_record():
    ref, message = _published_attempt("retry-trip")
    message = message.assign("retries_left", 1)  # TestAlarms retries once
    with CaptureQueriesContext(connection) as queries:
        action = respond(ref, message, Response("error", error="boom"), dt.datetime.now(dt.UTC))
    assert action == "retried"
    assert len(_ours(queries)) == 1, _ours(queries)
    row = Alarm.objects.get(message_id="retry-trip")
    assert row.state == states.PENDING and row.deadline is None
    assert list(AlarmAttempt.objects.filter(message_id="retry-trip").values_list("attempt", "status")) == [(1, "error")]


@postgres_only
def test_a_stale_response_changes_nothing_in_one_statement():
    ref, _message = _published_attempt("stale-trip")
    stale = store.AttemptRef(
        ref.pk, ref.message_id, ref.scheduller, ref.attempt, ref.deadline - dt.timedelta(seconds=1)
    )
    assert store.finish(stale, Response("ok"), dt.datetime.now(dt.UTC), keep_history=False) is False
    assert Alarm.objects.get(message_id="stale-trip").state == states.PUBLISHED


def test_beat_keeps_at_most_max_in_flight_attempts_published_and_claims_more_as_answers_come(beat, settings):
    settings.CELERY_SCHEDULLER_MAX_IN_FLIGHT = 4  # testapp.stale goes to a queue no worker here consumes
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    TestAlarms().dispatch_many([(Message.new("testapp.stale", id=f"capped-{n}"), "agg", past) for n in range(10)])
    scheduler = beat()
    delay = scheduler.tick_alarms(time.time())
    published = Alarm.objects.filter(message_id__startswith="capped-", state=states.PUBLISHED)
    assert published.count() == 4 and scheduler.alarm_engine.published == 4
    assert 0 < delay <= 0.05  # looks again shortly, not at the next poll
    time.sleep(delay)
    scheduler.tick_alarms(time.time())
    assert scheduler.alarm_engine.published == 4  # nobody answered: nothing more goes out
    for row in published.values(*store.ROW_FIELDS)[:3]:  # three answers come back
        respond(store.AttemptRef.of_row(row), store.message_from_row(row), Response("ok"), dt.datetime.now(dt.UTC))
    time.sleep(0.06)
    scheduler.tick_alarms(time.time())
    assert scheduler.alarm_engine.published == 7
    assert Alarm.objects.filter(message_id__startswith="capped-", state=states.PUBLISHED).count() == 4


def _counting_claims(monkeypatch) -> list[int]:
    """The room each counted claim (``store.claim_due_within``) found, in order; the real claim runs."""
    found: list[int] = []
    real = store.default.claim_due_within

    def counted(*args, **kwargs):
        room, rows = real(*args, **kwargs)
        found.append(room)
        return room, rows

    monkeypatch.setattr(store.default, "claim_due_within", counted)
    return found


def _stale_due(prefix: str, count: int) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    TestAlarms().dispatch_many([(Message.new("testapp.stale", id=f"{prefix}-{n}"), "agg", past) for n in range(count)])


def _seconds_ago(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)


def _in_flight(prefix: str) -> int:
    return Alarm.objects.filter(message_id__startswith=prefix, state=states.PUBLISHED).count()


def test_far_below_the_cap_beat_claims_without_counting_what_is_in_flight_each_time(beat, settings, monkeypatch):
    settings.CELERY_SCHEDULLER_MAX_IN_FLIGHT = 100
    settings.CELERY_SCHEDULLER_BATCH_SIZE = 5
    _stale_due("far", 40)
    counts = _counting_claims(monkeypatch)
    scheduler = beat()
    for _ in range(8):  # one claim of 5 per tick
        scheduler.tick_alarms(time.time())
    assert _in_flight("far") == 40 and scheduler.alarm_engine.published == 40
    # counted once (room 100); each later claim left at least a quarter of the cap free by that count
    assert counts == [100]


def test_near_the_cap_beat_counts_before_every_claim_and_stops_at_it(beat, settings, monkeypatch):
    settings.CELERY_SCHEDULLER_MAX_IN_FLIGHT = 12
    settings.CELERY_SCHEDULLER_BATCH_SIZE = 5
    _stale_due("near", 20)
    counts = _counting_claims(monkeypatch)
    scheduler = beat()
    for _ in range(5):
        scheduler.tick_alarms(time.time())
        time.sleep(0.06)  # past the pause a throttled beat takes
    assert _in_flight("near") == 12
    assert counts[:4] == [12, 7, 2, 0]


def test_held_back_by_the_cap_beat_looks_again_after_its_pause_not_as_held_alarms_come_due(beat, settings, monkeypatch):
    """Each look under the cap counts every attempt in flight: alarms beat holds coming due while it is
    held back wait for the look after the pause, which takes them all."""
    from celery_scheduller import engine

    monkeypatch.setattr(engine, "THROTTLE_PAUSE", 2.0)
    settings.CELERY_SCHEDULLER_MAX_IN_FLIGHT = 4
    settings.CELERY_SCHEDULLER_POLL_INTERVAL = 60_000
    _stale_due("capfull", 4)
    TestAlarms().dispatch_many(
        [(Message.new("testapp.stale", id=f"capheld-{n}"), "agg", _seconds_ago(-0.5 - n * 0.05)) for n in range(3)]
    )
    scheduler = beat()
    scheduler.tick_alarms(time.time())  # the cap's 4 go out: held back from here
    assert _in_flight("capfull") == 4 and "capheld-2" in scheduler.alarm_engine.heap
    counts = _counting_claims(monkeypatch)
    looked_until = time.time() + 0.9  # the held three come due meanwhile, the pause not over
    while time.time() < looked_until:
        scheduler.tick_alarms(time.time())
        time.sleep(0.02)
    assert counts == [] and _in_flight("capheld") == 0
    for row in Alarm.objects.filter(message_id__startswith="capfull").values(*store.ROW_FIELDS)[:3]:
        respond(store.AttemptRef.of_row(row), store.message_from_row(row), Response("ok"), dt.datetime.now(dt.UTC))
    time.sleep(max(0.0, scheduler.alarm_engine._claimed_at + 2.0 - time.time()) + 0.01)
    scheduler.tick_alarms(time.time())
    assert counts == [3] and _in_flight("capheld") == 3


def test_what_other_beats_claim_is_counted_within_a_recount_and_the_cap_holds(beat, settings, monkeypatch):
    from celery_scheduller import engine

    monkeypatch.setattr(engine, "ROOM_RECOUNT", 0.2)
    settings.CELERY_SCHEDULLER_MAX_IN_FLIGHT = 100
    settings.CELERY_SCHEDULLER_BATCH_SIZE = 5
    _stale_due("shared", 200)
    counts = _counting_claims(monkeypatch)
    scheduler = beat()
    scheduler.tick_alarms(time.time())  # counts 100 free, claims 5
    store.claim_due([TestAlarms.name], dt.datetime.now(dt.UTC), 80)  # another beat, unseen by this one's count
    time.sleep(0.25)
    for _ in range(10):
        scheduler.tick_alarms(time.time())
        time.sleep(0.06)
    assert _in_flight("shared") == 100
    assert counts[:2] == [100, 15]


def test_between_polls_claims_start_at_the_floor_and_the_poll_finds_what_lies_below_it(beat, settings, monkeypatch):
    """Claimed rows leave index entries where a claim's range starts; between polls beat claims from
    the time its last claim took everything by, and leaves rows below it that it does not hold (a
    retry a worker wrote) to the poll."""
    from celery_scheduller import notify

    settings.CELERY_SCHEDULLER_POLL_INTERVAL = 60_000
    held = TestAlarms().dispatch(Message.new("testapp.stale", id="held"), "agg", in_ms=1_500)
    scheduler = beat()
    engine = scheduler.alarm_engine
    scheduler.tick_alarms(time.time())  # loads "held" into the window; the poll's claim finds nothing due
    assert "held" in engine.heap and engine._floor is not None
    with monkeypatch.context() as unannounced:  # as a worker's retry: written, not announced
        unannounced.setattr(notify, "supported", lambda: False)
        TestAlarms().dispatch(Message.new("testapp.stale", id="below"), "agg", at=_seconds_ago(5))
    time.sleep(max(0.0, held.dispatch_at.timestamp() - time.time()) + 0.05)
    scheduler.tick_alarms(time.time())  # "held" comes due: a claim from the floor, lowered to its due time
    assert Alarm.objects.get(message_id="held").state == states.PUBLISHED
    assert Alarm.objects.get(message_id="below").state == states.PENDING
    engine.next_poll_at = 0.0
    scheduler.tick_alarms(time.time())  # the poll claims from the beginning
    assert Alarm.objects.get(message_id="below").state == states.PUBLISHED


@postgres_only
def test_an_announced_alarm_due_below_the_floor_goes_out_without_waiting_for_the_poll(beat, settings):
    settings.CELERY_SCHEDULLER_POLL_INTERVAL = 60_000
    scheduler = beat()
    scheduler.tick_alarms(time.time())  # the poll: the floor is set just before now
    TestAlarms().dispatch(Message.new("testapp.stale", id="late-one"), "agg", at=_seconds_ago(5))
    published = Alarm.objects.filter(message_id="late-one", state=states.PUBLISHED)
    run_beat(scheduler, published.exists, 2, "the announced alarm published")  # the next poll is a minute off


def test_a_claim_within_the_cap_takes_at_most_the_room_left_and_says_how_much_there_was():
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    TestAlarms().dispatch_many(
        [(Message.new("testapp.stale", id=f"room-{n}"), "agg", past + dt.timedelta(milliseconds=n)) for n in range(10)]
    )
    FaultAlarms().dispatch_many([(Message.new("testapp.stale", id=f"other-{n}"), "agg", past) for n in range(3)])
    store.claim_due([FaultAlarms.name], dt.datetime.now(dt.UTC), 10)  # another Scheduller's: not counted
    names, now = [TestAlarms.name], dt.datetime.now(dt.UTC)
    room, rows = store.claim_due_within(names, now, 100, 4)
    assert room == 4 and [row["message_id"] for row in rows] == [f"room-{n}" for n in range(4)]
    assert all(row["attempt"] == 1 for row in rows)
    assert Alarm.objects.filter(message_id__startswith="room-", state=states.PUBLISHED).count() == 4
    assert store.claim_due_within(names, now, 100, 4) == (0, [])
    for row in rows[:3]:  # three answers come back
        respond(store.AttemptRef.of_row(row), store.message_from_row(row), Response("ok"), dt.datetime.now(dt.UTC))
    room, rows = store.claim_due_within(names, now, 2, 4)
    assert room == 3 and [row["message_id"] for row in rows] == ["room-4", "room-5"]
    room, rows = store.claim_due_within(names, now, 100, 50)
    assert room == 47 and len(rows) == 4  # the last four pending; three in flight before
    assert store.claim_due_within(names, now, 100, 50) == (43, [])


def test_the_in_flight_count_is_of_the_named_schedullers_published_attempts_and_stops_at_its_cap():
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    TestAlarms().dispatch_many([(Message.new("testapp.stale", id=f"ours-{n}"), "agg", past) for n in range(6)])
    FaultAlarms().dispatch_many([(Message.new("testapp.stale", id=f"theirs-{n}"), "agg", past) for n in range(3)])
    store.claim_due([TestAlarms.name], dt.datetime.now(dt.UTC), 5)  # five of ours published, one pending
    store.claim_due([FaultAlarms.name], dt.datetime.now(dt.UTC), 10)
    now = dt.datetime.now(dt.UTC)
    assert store.count_in_flight([TestAlarms.name], 100, now) == 5
    assert store.count_in_flight([TestAlarms.name], 3, now) == 3
    assert store.count_in_flight([TestAlarms.name, FaultAlarms.name], 100, now) == 8
    assert store.count_in_flight(["nobody"], 100, now) == 0
    assert store.count_in_flight([TestAlarms.name], 100, past - dt.timedelta(seconds=1)) == 0  # none due yet


def test_attempts_published_ahead_count_towards_the_cap_from_their_due_time():
    now = dt.datetime.now(dt.UTC)
    soon = now + dt.timedelta(seconds=30)
    TestAlarms().dispatch_many([(Message.new("testapp.stale", id=f"held-{n}"), "agg", soon) for n in range(4)])
    TestAlarms().dispatch_many([(Message.new("testapp.stale", id=f"due-{n}"), "agg", now) for n in range(3)])
    names = [TestAlarms.name]
    room, rows = store.claim_due_within(names, now, 100, 5, until=soon)  # published ahead, not yet due
    assert room == 5 and len(rows) == 5
    assert store.count_in_flight(names, 100, now) == 3  # the three due; the two held ahead of time do not count
    assert store.count_in_flight(names, 100, soon) == 5
    room, rows = store.claim_due_within(names, now, 100, 5, until=soon)
    assert room == 2 and len(rows) == 2  # the last two held ones: the cap counts only what is due
    assert store.claim_due_within(names, soon, 100, 5, until=soon) == (0, [])


def test_a_bad_max_in_flight_is_a_system_check_error(settings):
    from celery_scheduller.checks import check_settings

    settings.CELERY_SCHEDULLER_MAX_IN_FLIGHT = "many"
    errors = [error for error in check_settings() if error.id == "celery_scheduller.E005"]
    assert len(errors) == 1 and "MAX_IN_FLIGHT" in errors[0].msg


def _alarm_table_scan_nodes(plan: list) -> list[dict]:
    """The nodes of an ``EXPLAIN (FORMAT JSON)`` plan that scan the alarm table."""
    found, nodes = [], [plan[0]["Plan"]]
    while nodes:
        node = nodes.pop()
        if node.get("Relation Name") == Alarm._meta.db_table and "Scan" in node["Node Type"]:
            found.append(node)
        nodes.extend(node.get("Plans", []))
    return found


def _scans_of_the_alarm_table(sql: str, params: list) -> list[tuple[str, str | None]]:
    """(node type, index) of each scan of the alarm table in the plan PostgreSQL picks for ``sql``."""
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
        (plan,) = cursor.fetchone()
    return [(node["Node Type"], node.get("Index Name")) for node in _alarm_table_scan_nodes(plan)]


@postgres_only
def test_the_claim_and_the_answer_look_their_rows_up_by_pk_whatever_the_statistics_say():
    """Statistics taken while every row was pending (as after a large ``dispatch_many``) once made the
    planner update the claimed rows through a sequential scan of the whole table, and delete answered
    ones through a hash of every published row: work growing with the table on every call."""
    fill(30_000, TestAlarms.name)
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {Alarm._meta.db_table} SET state = %s", [states.PENDING])
        cursor.execute(f"ANALYZE {Alarm._meta.db_table}")
    now = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)  # about 33,000 due: more than any claim takes
    names = [TestAlarms.name]
    rows = store.claim_due(names, now, 500)
    store.claim_due_within(names, now, 200, 1000)
    pkey = Alarm._meta.db_table + "_pkey"
    for sql, params in (
        (postgres.CLAIM, postgres.claim_params(names, now, 100)),
        (postgres.CLAIM_WITHIN, postgres.claim_within_params(names, now, 100, 1000)),
        (
            postgres.FINISH_REMOVED_MANY.sql,
            postgres.FINISH_REMOVED_MANY.params([store.AttemptRef.of_row(row) for row in rows[:50]]),
        ),
    ):
        scans = _scans_of_the_alarm_table(sql, params)
        assert ("Seq Scan", None) not in scans, scans
        assert ("Index Scan", pkey) in scans, scans
    # and they still do their work
    refs = [store.AttemptRef.of_row(row) for row in rows]
    assert store.finish_many(refs) == {ref.pk for ref in refs}
    assert Alarm.objects.filter(state=states.PUBLISHED).count() == 200


def _alarm_table_scans_run(sql: str, params: list) -> list[dict]:
    """The scans of the alarm table, with what they read, when PostgreSQL ran ``sql`` (rolled back)."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", params)
        (plan,) = cursor.fetchone()
        transaction.set_rollback(True)
    return _alarm_table_scan_nodes(plan)


def _rows_read_from_the_alarm_table(sql: str, params: list) -> int:
    """Rows the alarm table's scans returned when PostgreSQL ran ``sql`` (rolled back)."""
    return sum(node["Actual Rows"] * node["Actual Loops"] for node in _alarm_table_scans_run(sql, params))


def _blocks_read_from_the_alarm_table(sql: str, params: list) -> int:
    """Pages the alarm table's scans read (cached or not) when PostgreSQL ran ``sql`` (rolled back)."""
    return sum(node["Shared Hit Blocks"] + node["Shared Read Blocks"] for node in _alarm_table_scans_run(sql, params))


@postgres_only
def test_a_claim_reads_no_further_than_the_due_range():
    """A claim that finds fewer rows due than it may take stops at the end of the due range. With the
    range written as a row comparison, PostgreSQL 15 stopped only where the Scheduller's index entries
    ended: every claim read on through all its later alarms and those in flight (140 ms a claim that
    found nothing with 1,000,000 pending)."""
    fill(40_000, TestAlarms.name)  # due over the next 30 days
    _stale_due("due-now", 3)
    names, now = [TestAlarms.name], dt.datetime.now(dt.UTC)
    for sql, params in (
        (postgres.CLAIM, postgres.claim_params(names, now, 10)),
        (postgres.CLAIM_WITHIN, postgres.claim_within_params(names, now, 10, 1_000)),
    ):
        assert _blocks_read_from_the_alarm_table(sql, params) < 40  # the index's leaf pages: about 200
    assert [row["message_id"] for row in store.claim_due(names, now, 10)] == [f"due-now-{n}" for n in range(3)]


@postgres_only
def test_a_claim_far_behind_reads_no_more_due_rows_than_it_takes():
    """Thousands of rows due at once (beat behind, or held back by MAX_IN_FLIGHT): a claim of ten reads
    about ten rows per Scheduller, in due order, the earliest of all of them first. It read and sorted
    every due row when the Schedullers were one ``ANY(…)`` condition, costing more the further behind.

    Also under statistics taken before the rows were pending (as in a table that had just been emptied):
    while the timeout and pruning indexes were led by ``state`` the planner took one of them and sorted
    every due row (27,000 here, 31 ms a claim against 0.5 ms) until the table was analysed again. A row
    comparison as the range forced the (scheduller, state, dispatch_at) index, but PostgreSQL did not stop
    at the range's end (``test_a_claim_reads_no_further_than_the_due_range``)."""
    fill(30_000, TestAlarms.name)
    table = Alarm._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {table} SET scheduller = %s WHERE id %% 2 = 0", [FaultAlarms.name])
        cursor.execute(f"UPDATE {table} SET state = %s WHERE state = %s", [states.PUBLISHED, states.PENDING])
        cursor.execute(f"ANALYZE {table}")  # statistics that know of no pending row
        cursor.execute(f"UPDATE {table} SET state = %s WHERE state = %s", [states.PENDING, states.PUBLISHED])
    names = [TestAlarms.name, FaultAlarms.name]
    now = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)  # every pending row due: about 27,000
    due = Alarm.objects.filter(state=states.PENDING, scheduller__in=names, dispatch_at__lte=now)
    assert due.count() > 20_000
    earliest = list(due.order_by("dispatch_at").values_list("message_id", flat=True)[:10])
    for statistics in ("stale", "fresh"):
        if statistics == "fresh":
            with connection.cursor() as cursor:
                cursor.execute(f"ANALYZE {table}")
        for sql, params in (
            (postgres.CLAIM, postgres.claim_params(names, now, 10)),
            (postgres.CLAIM_WITHIN, postgres.claim_within_params(names, now, 10, 1_000)),
        ):
            # ten per Scheduller from the index, then the ten claimed again by pk; the cap's count reads none
            assert _rows_read_from_the_alarm_table(sql, params) <= 10 * len(names) + 10, statistics
    rows = store.claim_due(names, now, 10)
    assert [row["message_id"] for row in rows] == earliest
    assert {row["scheduller"] for row in rows} == set(names)
    room, rows = store.claim_due_within(names, now, 10, 1_000)
    assert room == 990 and len(rows) == 10
    assert Alarm.objects.filter(state=states.PUBLISHED).count() == 20


def test_beat_answers_a_batch_of_timeouts_in_three_statements():
    """Every worker gone: beat leases the attempts whose deadline passed in two statements, and its
    callback threads hand what ``service_responded`` decided to the response writer, which stores them
    together on PostgreSQL (``bench/timeouts.py`` measures the rate)."""
    from celery_scheduller.engine import AlarmEngine
    from tests.celery_app import app

    alarms = TestAlarms()
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    assigns = {"retries_left": 1, "retry_ms": 60_000}
    alarms.dispatch_many((Message.new("testapp.record", id=f"gone-{n}", assigns=assigns), "a", past) for n in range(50))
    assert len(store.claim_due([TestAlarms.name], dt.datetime.now(dt.UTC), 100)) == 50
    Alarm.objects.update(deadline=past)
    engine = AlarmEngine(app, names=lambda: [TestAlarms.name])
    try:
        with CaptureQueriesContext(connection) as queries:
            more = engine._answer_timeouts([TestAlarms.name], dt.datetime.now(dt.UTC))
        ours = [q["sql"] for q in queries.captured_queries if "celery_scheduller_alarm" in q["sql"]]
        assert len(ours) == 2, ours  # the lease: lock, move the deadlines; the loop stores nothing itself
        stored = lambda: Alarm.objects.filter(state=states.PENDING, attempt=1, dispatch_at__gt=past).count() == 50  # noqa: E731
        wait_for(stored, 10, "the retries stored")
    finally:
        engine.close()
    assert not more and engine.timeouts == 50
    assert Alarm.objects.filter(state=states.PENDING, attempt=1, dispatch_at__gt=past).count() == 50
    assert AlarmAttempt.objects.filter(status="timeout", decision="retry in 60000 ms").count() == 50
