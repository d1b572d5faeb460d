"""The async API: the same checks, the same rows, the same transactional behaviour as the sync calls."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from asgiref.sync import sync_to_async
from django.db import transaction
from django.utils import timezone

from celery_scheduller import InvalidAlarm, Message, states
from celery_scheduller.models import Alarm
from tests.testapp.alarms import TestAlarms

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_sync_thread_connections")]


def test_async_calls_schedule_cancel_and_reschedule_as_the_sync_ones_do():
    alarms = TestAlarms()
    later = timezone.now() + dt.timedelta(hours=1)

    async def scenario() -> tuple[object, ...]:
        saved = await alarms.adispatch(Message.new("testapp.record", id="a-1"), "agg-a", in_ms=60_000)
        many = await alarms.adispatch_many(
            [(Message.new("testapp.record", id=f"a-many-{n}"), "agg-many", later) for n in range(3)]
        )
        moved = await alarms.areschedule("a-1", at=later)
        cancelled = await alarms.acancel("a-many-0")
        by_aggregate = await alarms.acancel_aggregate("agg-many")
        return saved, many, moved, cancelled, by_aggregate

    saved, many, moved, cancelled, by_aggregate = asyncio.run(scenario())
    assert saved.dispatch_at is not None and [m.id for m in many] == ["a-many-0", "a-many-1", "a-many-2"]
    assert moved and cancelled and by_aggregate == 2
    assert Alarm.objects.get(message_id="a-1").dispatch_at == later
    assert Alarm.objects.filter(aggregate_id="agg-many", state=states.CANCELLED).count() == 3


def test_async_dispatch_refuses_bad_input_and_rolls_back_with_the_callers_transaction():
    alarms = TestAlarms()
    naive = dt.datetime(2030, 1, 1)  # noqa: DTZ001 - the bad input under test

    async def bad() -> None:
        await alarms.adispatch(Message.new("testapp.record", id="a-bad"), "agg", at=naive)

    with pytest.raises(InvalidAlarm, match="naive"):
        asyncio.run(bad())

    def in_a_transaction_that_fails() -> None:
        with transaction.atomic():
            async_to_sync_dispatch()
            raise RuntimeError("the view failed after scheduling")

    def async_to_sync_dispatch() -> None:
        from asgiref.sync import async_to_sync

        async_to_sync(alarms.adispatch)(Message.new("testapp.record", id="a-rolled-back"), "agg", in_ms=1_000)

    async def view() -> None:
        await sync_to_async(in_a_transaction_that_fails)()

    with pytest.raises(RuntimeError, match="the view failed"):
        asyncio.run(view())
    assert not Alarm.objects.filter(message_id__in=["a-bad", "a-rolled-back"]).exists()
