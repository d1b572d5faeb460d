"""A Scheduller that overrides ``save_alarm`` (the contract's persistence callback) is called through it
by ``dispatch`` and ``dispatch_many``, once per alarm, with the Message as it is stored."""

from __future__ import annotations

import datetime as dt

import pytest
from django.utils import timezone

from celery_scheduller import Message
from celery_scheduller.models import Alarm
from tests.testapp.alarms import AuditedAlarms

pytestmark = pytest.mark.django_db


@pytest.fixture
def audited(settings):
    settings.CELERY_SCHEDULLER_CLASSES = [*settings.CELERY_SCHEDULLER_CLASSES, "tests.testapp.alarms.AuditedAlarms"]
    AuditedAlarms.saved = []
    return AuditedAlarms()


def test_dispatch_stores_through_the_override_with_dispatch_at_assigned(audited):
    at = timezone.now() + dt.timedelta(minutes=5)
    saved = audited.dispatch(Message.new("testapp.record", {"n": 1}, id="one"), "agg-1", at=at)
    assert AuditedAlarms.saved == [("one", "agg-1", at)]
    assert saved.assigns["dispatch_at"] == at
    row = Alarm.objects.get(message_id="one")
    assert (row.scheduller, row.aggregate_id, row.dispatch_at, row.raw_request) == ("audited", "agg-1", at, {"n": 1})


def test_dispatch_many_calls_the_override_once_per_alarm_in_order(audited):
    at = timezone.now() + dt.timedelta(minutes=5)
    batch = [
        (Message.new("testapp.record", {"n": n}, id=f"m{n}"), f"agg-{n % 2}", at + dt.timedelta(seconds=n))
        for n in range(5)
    ]
    audited.dispatch_many(batch)
    assert AuditedAlarms.saved == [(f"m{n}", f"agg-{n % 2}", at + dt.timedelta(seconds=n)) for n in range(5)]
    stored = dict(Alarm.objects.filter(scheduller="audited").values_list("message_id", "dispatch_at"))
    assert stored == {f"m{n}": at + dt.timedelta(seconds=n) for n in range(5)}


def test_an_override_that_raises_stores_nothing_of_that_call_and_keeps_what_was_stored(audited):
    at = timezone.now() + dt.timedelta(minutes=5)
    audited.dispatch(Message.new("testapp.record", {}, id="kept"), "agg", at=at)
    with pytest.raises(ValueError, match="may not schedule"):
        audited.dispatch(Message.new("testapp.record", {}, id="no"), "refused", at=at)
    assert list(Alarm.objects.values_list("message_id", flat=True)) == ["kept"]


def test_dispatch_many_is_all_or_nothing_when_the_override_refuses_one(audited):
    at = timezone.now() + dt.timedelta(minutes=5)
    audited.dispatch(Message.new("testapp.record", {}, id="kept"), "agg", at=at)
    batch = [(Message.new("testapp.record", {}, id=f"b{n}"), "refused" if n == 2 else "agg", at) for n in range(4)]
    with pytest.raises(ValueError, match="may not schedule"):
        audited.dispatch_many(batch)
    assert [m for m, _agg, _at in AuditedAlarms.saved] == ["kept", "b0", "b1"]  # reached before the refusal
    assert list(Alarm.objects.values_list("message_id", flat=True)) == ["kept"]  # and rolled back with it
