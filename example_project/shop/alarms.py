"""The shop's Scheduller: order expiry and payment reminders."""

import datetime as dt

from django.db import transaction
from django.utils import timezone

from celery_scheduller import OK, Fail, Message, Retry, Scheduller
from celery_scheduller.models import Alarm

from .models import Event, Order

EXPIRE_AFTER = dt.timedelta(seconds=20)
REMIND_AFTER = dt.timedelta(seconds=5)


class OrderAlarms(Scheduller):
    """Expires unpaid orders; retries a failed reminder up to three times, doubling the wait, then fails it."""

    name = "orders"

    def service_responded(self, message: Message):
        response = message.response
        tries = message.assigns.get("tries", 0)
        if response.ok:
            return OK
        if tries >= 3:  # give up visibly: the alarm ends failed, with the reason, in the admin's failed view
            return Fail(f"{message.service_name} failed {tries + 1} times; last: {response.error or response.status}")
        wait_ms = 1_000 * 2**tries
        order_id = message.raw_request.get("order_id")
        if order_id is None:
            return Fail("no order_id in the message")
        Event.objects.create(
            order_id=order_id,
            kind="retry scheduled",
            detail=f"{message.service_name}: {response.error or response.status}; again in {wait_ms} ms",
        )
        return Retry(wait_ms, message.assign("tries", tries + 1))

    def dispatch_timeout(self, message: Message) -> int:
        return 3_000

    def in_memory_interval(self) -> int:
        return 10_000


def place_order(customer: str, expire_after=EXPIRE_AFTER, remind_after=REMIND_AFTER, warehouse=False) -> Order:
    """Create an order and, in the same transaction, its expiry and reminder alarms (and, with
    ``warehouse``, a warehouse notification whose slow first try times out)."""
    alarms = OrderAlarms()
    with transaction.atomic():
        order = Order.objects.create(customer=customer)
        key = f"order-{order.pk}"
        alarms.dispatch(
            Message.new("shop.tasks.expire_order", {"order_id": order.pk}, id=f"expire-{order.pk}"),
            key,
            in_ms=int(expire_after.total_seconds() * 1000),
        )
        alarms.dispatch(
            Message.new("shop.tasks.send_reminder", {"order_id": order.pk}, id=f"remind-{order.pk}"),
            key,
            in_ms=int(remind_after.total_seconds() * 1000),
        )
        if warehouse:
            alarms.dispatch(
                Message.new("shop.tasks.notify_warehouse", {"order_id": order.pk}, id=f"warehouse-{order.pk}"),
                key,
                in_ms=1_000,
            )
    return order


def seed_loyalty_alarms(count: int) -> int:
    """Schedule ``count`` loyalty mails over the next 30 days (so the admin holds thousands of alarms)."""
    alarms = OrderAlarms()
    now = timezone.now()
    existing = Alarm.objects.filter(message_id__startswith="loyalty-").count()
    batch = [
        (
            Message.new("shop.tasks.send_loyalty_mail", {"customer": f"customer {i}"}, id=f"loyalty-{i}"),
            f"customer-{i}",
            now + dt.timedelta(seconds=30 * 86_400 * (i + 1) / (count + 1)),
        )
        for i in range(existing, count)
    ]
    alarms.dispatch_many(batch)
    return len(batch)


def pay(order: Order) -> int:
    """Mark an order paid and cancel its alarms; returns how many were cancelled. Where Django's Tasks
    framework is available, the receipt goes out 3 s later through it (``shop.jobs``), the same engine."""
    from django.conf import settings

    with transaction.atomic():
        Order.objects.filter(pk=order.pk).update(status=Order.PAID)
        Event.objects.create(order=order, kind="paid")
        if settings.TASKS_AVAILABLE:
            from .jobs import send_receipt

            send_receipt.using(run_after=timezone.now() + dt.timedelta(seconds=3)).enqueue(order.pk)
        return OrderAlarms().cancel_aggregate(f"order-{order.pk}")
