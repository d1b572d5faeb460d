"""Bad input fails at ``dispatch`` with a clear error and loses nothing already stored."""

from __future__ import annotations

import datetime as dt
import decimal

import pytest
from django.core.management import call_command
from django.utils import timezone

from celery_scheduller import InvalidAlarm, Message, UnknownScheduller
from celery_scheduller.models import Alarm
from celery_scheduller.store import postgres
from tests.testapp.alarms import TestAlarms, UnlistedAlarms

pytestmark = pytest.mark.django_db

NAIVE = dt.datetime(2030, 1, 1)  # noqa: DTZ001 - the bad input under test


@pytest.fixture
def stored():
    """One alarm already stored, which no bad call may touch."""
    alarms = TestAlarms()
    alarms.dispatch(Message.new("testapp.record", {"keep": True}, id="stored"), "agg", in_ms=60_000)
    before = Alarm.objects.values().get(message_id="stored")
    yield alarms
    assert Alarm.objects.count() == 1
    assert Alarm.objects.values().get(message_id="stored") == before


def msg(**kwargs):
    return Message.new("testapp.record", **kwargs)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda a: a.dispatch(msg(), "agg", at=NAIVE), "naive"),
        (lambda a: a.dispatch(msg(), "agg", at=timezone.now(), in_ms=5), "exactly one of at= .* or in_ms="),
        (lambda a: a.dispatch(msg(), "agg"), "exactly one of at= .* or in_ms="),
        (lambda a: a.dispatch(msg(), "agg", in_ms=-1), "must not be negative"),
        (lambda a: a.dispatch(msg(), "agg", in_ms=1.5), "in_ms must be an integer"),
        (lambda a: a.dispatch(msg(), "agg", in_ms=10**15), r"in_ms=10{15} is after the last time .* \(year 9999\)"),
        (lambda a: a.dispatch(msg(), "agg", at="2030-01-01T00:00:00Z"), "at must be a datetime"),
        (
            lambda a: a.dispatch(Message.new("testapp.record", {"when": {1, 2}}), "agg", in_ms=0),
            r"raw_request\['when'\]: set .* is not JSON-serializable",
        ),
        (lambda a: a.dispatch(Message.new("testapp.record", {"n": decimal.Decimal(1)}), "agg", in_ms=0), "Decimal"),
        (lambda a: a.dispatch(msg().assign("obj", object()), "agg", in_ms=0), r"assigns\['obj'\]"),
        (
            lambda a: a.dispatch(msg().assign("when", NAIVE), "agg", in_ms=0),
            r"assigns\['when'\]: naive datetime",
        ),
        (
            lambda a: a.dispatch(Message.new("shop.no_such_task"), "agg", in_ms=0),
            "no Celery task named 'shop.no_such_task'",
        ),
        (lambda a: a.dispatch(msg(), "", in_ms=0), "aggregate_id"),
        (lambda a: a.dispatch({"service_name": "testapp.record"}, "agg", in_ms=0), "needs a Message"),
        (
            lambda a: a.dispatch_many([(msg(id="ok-one"), "agg", timezone.now()), (msg(id="bad-one"), "agg", NAIVE)]),
            "naive",
        ),
        (  # refused in the third batch, after two were sent (pipelined on PostgreSQL): none stays
            lambda a: a.dispatch_many(
                [(msg(id=f"many-{n}"), "agg", timezone.now()) for n in range(4_500)]
                + [(msg(id="late-bad"), "agg", NAIVE)]
                + [(msg(id=f"after-{n}"), "agg", timezone.now()) for n in range(100)]
            ),
            "naive",
        ),
        # PostgreSQL stores no NUL in text or JSON; refused on every database alike, before any write
        (lambda a: a.dispatch(msg(), "agg\x00", in_ms=0), "aggregate_id contains a NUL character"),
        (lambda a: a.dispatch(msg(raw_request={"k": "a\x00b"}), "agg", in_ms=0), "raw_request contains a NUL"),
        (lambda a: a.dispatch(msg(raw_request={"k\x00": 1}), "agg", in_ms=0), "raw_request contains a NUL"),
        (lambda a: a.dispatch(msg().assign("k", ["\x00"]), "agg", in_ms=0), "assigns contains a NUL"),
        (
            lambda a: a.dispatch_many(
                [(msg(id="ok-two"), "agg", timezone.now()), (msg(raw_request={"k": "\x00"}), "agg", timezone.now())]
            ),
            "raw_request contains a NUL",
        ),
    ],
)
def test_bad_dispatch_raises_a_clear_error_and_stores_nothing(stored, call, error):
    with pytest.raises(InvalidAlarm, match=error):
        call(stored)


def test_text_that_only_spells_a_nul_escape_is_stored_as_it_is(stored):
    """The check looks for the character, not for its JSON escape written out as text."""
    spelled = {"path": "C:\\u0000", "escaped": "\\\\u0000", "key\\u0000": 1}
    stored.dispatch(msg(id="spelled", raw_request=spelled), "agg\\u0000", in_ms=60_000)
    row = Alarm.objects.get(message_id="spelled")
    assert (row.raw_request, row.aggregate_id) == (spelled, "agg\\u0000")
    row.delete()  # the fixture checks that only its own alarm is left


def test_message_ids_and_task_name_refuse_nul_where_the_message_is_made():
    for fields in ({"id": "a\x00"}, {"correlation_id": "\x00"}, {"causation_id": "c\x00"}):
        with pytest.raises(InvalidAlarm, match="contains a NUL character"):
            msg(**fields)
    with pytest.raises(InvalidAlarm, match="service_name contains a NUL"):
        Message.new("testapp.record\x00")


def test_raw_request_must_be_keyword_arguments():
    with pytest.raises(InvalidAlarm, match="raw_request must be a dict"):
        Message.new("testapp.record", [1, 2])


def test_scheduller_not_in_settings_is_refused(stored):
    with pytest.raises(UnknownScheduller, match="not in CELERY_SCHEDULLER_CLASSES"):
        UnlistedAlarms().dispatch(msg(), "agg", in_ms=0)
    with pytest.raises(UnknownScheduller):
        UnlistedAlarms().cancel("stored")


@pytest.mark.parametrize("timeout", [0, -1, 2**31, 1.5, True])
def test_invalid_dispatch_timeout_is_refused_at_dispatch(stored, monkeypatch, timeout):
    """2**31 ms: more than the timeout_ms column holds on PostgreSQL and MariaDB (a DataError there, before)."""
    monkeypatch.setattr(TestAlarms, "dispatch_timeout", lambda self, message: timeout)
    with pytest.raises(InvalidAlarm, match=r"dispatch_timeout must return a positive integer \(ms\) of at most"):
        stored.dispatch(msg(), "agg", in_ms=0)
    with pytest.raises(InvalidAlarm, match="dispatch_timeout must return"):
        stored.dispatch_many([(msg(id=f"timed-{n}"), "agg", timezone.now()) for n in range(3)])


def test_the_longest_dispatch_timeout_is_stored(stored, monkeypatch):
    monkeypatch.setattr(TestAlarms, "dispatch_timeout", lambda self, message: 2**31 - 1)
    stored.dispatch(msg(id="longest"), "agg", in_ms=60_000)
    assert Alarm.objects.get(message_id="longest").timeout_ms == 2**31 - 1
    Alarm.objects.filter(message_id="longest").delete()  # leave only ``stored`` for the fixture


def test_dispatch_many_stores_a_batch_and_skips_ids_already_stored(stored):
    now = timezone.now()
    saved = stored.dispatch_many(
        [(msg(id=f"bulk-{i}"), f"agg-{i}", now + dt.timedelta(seconds=i)) for i in range(50)]
        + [(msg(id="stored"), "agg", now)]
    )
    assert len(saved) == 51
    assert Alarm.objects.filter(message_id__startswith="bulk-").count() == 50
    Alarm.objects.filter(message_id__startswith="bulk-").delete()  # leave only ``stored`` for the fixture


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "batch-by-batch"])
def test_dispatch_many_stores_every_batch_of_a_long_list(stored, monkeypatch, pipelined):
    """Longer than ``_DISPATCH_BATCH``: stored in several batches, each row as given, ids already stored
    skipped in any batch; on PostgreSQL also without pipeline mode (libpq before 14)."""
    monkeypatch.setattr(postgres, "pipeline_supported", lambda: pipelined)
    now = timezone.now()
    given = [
        (msg(id=f"long-{i}", raw_request={"i": i}), f"agg-{i % 7}", now + dt.timedelta(seconds=i)) for i in range(4_321)
    ]
    given.insert(3_000, (msg(id="stored"), "agg", now))
    saved = stored.dispatch_many(given)
    assert len(saved) == 4_322
    rows = Alarm.objects.filter(message_id__startswith="long-")
    assert rows.count() == 4_321
    for i in (0, 1_999, 2_000, 4_320):
        row = rows.get(message_id=f"long-{i}")
        assert (row.raw_request, row.aggregate_id, row.dispatch_at) == (
            {"i": i},
            f"agg-{i % 7}",
            now + dt.timedelta(seconds=i),
        )
    rows.delete()  # leave only ``stored`` for the fixture


def test_dispatching_an_id_already_pending_changes_nothing(stored):
    """The fixture checks that the stored row is as it was (one-row insert and batch insert alike)."""
    stored.dispatch(msg(id="stored", raw_request={"keep": False}), "other", in_ms=0)
    stored.dispatch_many([(msg(id="stored", raw_request={"keep": 0}), "another", timezone.now())] * 2)


def test_datetimes_in_assigns_round_trip_and_load_alarms_covers_its_slice(stored):
    when = dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    now = timezone.now()
    saved = stored.dispatch(msg(id="with-dt").assign("when", when), "agg", in_ms=1000, now=now)
    loaded = {m.id: m for m in stored.load_alarms(None, now + dt.timedelta(seconds=2))}
    assert set(loaded) == {"with-dt"}  # ``stored`` is due in a minute, outside the slice
    assert loaded["with-dt"].assigns["when"] == when
    assert loaded["with-dt"].dispatch_at == saved.dispatch_at
    later = stored.load_alarms(now + dt.timedelta(seconds=1), now + dt.timedelta(minutes=2))
    assert [m.id for m in later] == ["stored"]  # (load_from, load_until]: with-dt sits on load_from
    Alarm.objects.filter(message_id="with-dt").delete()


def test_models_and_migrations_agree():
    call_command("makemigrations", "celery_scheduller", "--check", "--dry-run", verbosity=0)
