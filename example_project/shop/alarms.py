"""The shop's Scheduller: order expiry and payment reminders."""

import datetime as dt

from django.db import transaction

from celery_scheduller import OK, Message, Retry, Scheduller

from .models import Event, Order

EXPIRE_AFTER = dt.timedelta(seconds=20)
REMIND_AFTER = dt.timedelta(seconds=5)


class OrderAlarms(Scheduller):
    """Expires unpaid orders; retries a failed reminder up to three times, doubling the wait."""

    name = "orders"

    def service_responded(self, message: Message):
        response = message.response
        tries = message.assigns.get("tries", 0)
        if response.ok or tries >= 3:
            return OK
        wait_ms = 1_000 * 2**tries
        Event.objects.create(
            order_id=message.raw_request["order_id"],
            kind="retry scheduled",
            detail=f"{message.service_name}: {response.status} {response.error or ''}; again in {wait_ms} ms",
        )
        return Retry(wait_ms, message.assign("tries", tries + 1))

    def dispatch_timeout(self, message: Message) -> int:
        return 3_000

    def in_memory_interval(self) -> int:
        return 10_000


def place_order(customer: str, expire_after=EXPIRE_AFTER, remind_after=REMIND_AFTER) -> Order:
    """Create an order and, in the same transaction, its expiry and reminder alarms."""
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
    return order


def pay(order: Order) -> int:
    """Mark an order paid and cancel its alarms; returns how many were cancelled."""
    with transaction.atomic():
        Order.objects.filter(pk=order.pk).update(status=Order.PAID)
        Event.objects.create(order=order, kind="paid")
        return OrderAlarms().cancel_aggregate(f"order-{order.pk}")
