"""The shop's tests, written against celery_scheduller's testing kit (the ``alarm_kit`` fixture): alarms
are delivered in the test's process by a clock the test moves, through the same decisions a worker and beat
take. ``pytest`` from this directory runs them (pytest and pytest-django installed)."""

import datetime as dt

from shop.alarms import REMIND_AFTER, OrderAlarms, pay, place_order
from shop.models import Event, Order


def test_placing_an_order_schedules_its_reminder_and_its_expiry(alarm_kit):
    order = place_order("ada")
    key = f"order-{order.pk}"
    [reminder] = alarm_kit.assert_dispatched("shop.tasks.send_reminder", aggregate_id=key)
    [expiry] = alarm_kit.assert_dispatched("shop.tasks.expire_order", aggregate_id=key)
    assert reminder.due == alarm_kit.now + REMIND_AFTER
    assert expiry.due > reminder.due and expiry.scheduller == OrderAlarms.scheduller_name()


def test_an_unpaid_order_gets_its_reminder_then_expires(alarm_kit):
    order = place_order("ada")  # an odd id is reminded at once; an even one after two refusals
    deliveries = alarm_kit.drain()
    assert {d.task for d in deliveries if d.action == "finished"} == {
        "shop.tasks.send_reminder",
        "shop.tasks.expire_order",
    }
    order.refresh_from_db()
    assert order.status == Order.EXPIRED
    assert Event.objects.filter(order=order, kind="reminder sent").exists()


def test_a_refused_reminder_is_retried_doubling_the_wait(alarm_kit):
    order = place_order("bob", expire_after=dt.timedelta(hours=1))
    alarm_kit.will_answer(f"remind-{order.pk}", error=ConnectionError("mail server busy"), times=2)
    alarm_kit.advance(seconds=5)
    [first] = alarm_kit.run_due()
    assert first.action == "retried" and first.retry_at == alarm_kit.now + dt.timedelta(seconds=1)
    second, third = alarm_kit.drain(until=dt.timedelta(minutes=1))
    assert (second.action, second.retry_at - second.delivered_at) == ("retried", dt.timedelta(seconds=2))
    assert (third.action, third.ran) == ("finished", True)


def test_a_reminder_that_keeps_failing_ends_failed_with_its_reason(alarm_kit):
    order = place_order("carol", expire_after=dt.timedelta(days=1))
    alarm_kit.will_answer(f"remind-{order.pk}", lost=True, times=4)
    deliveries = [d for d in alarm_kit.drain() if d.message_id == f"remind-{order.pk}"]
    assert [d.action for d in deliveries] == ["retried", "retried", "retried", "failed"]
    assert deliveries[-1].reason.startswith("shop.tasks.send_reminder failed 4 times; last: WorkerLostError")


def test_paying_cancels_the_orders_alarms(alarm_kit):
    order = place_order("dave")
    assert pay(order) == 2
    alarm_kit.assert_not_dispatched(aggregate_id=f"order-{order.pk}", state="pending")
    alarm_kit.advance(days=1)
    assert [d for d in alarm_kit.drain() if d.task.startswith("shop.tasks.")] == []
