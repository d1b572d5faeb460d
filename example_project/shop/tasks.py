"""The shop's tasks; the alarms deliver them."""

import logging

from celery import shared_task
from django.utils import timezone

from celery_scheduller import current_message

from .models import Event, Order

logger = logging.getLogger(__name__)


def _due() -> object:
    message = current_message()
    return message.assigns.get("dispatch_at") if message else None


@shared_task(name="shop.tasks.expire_order")
def expire_order(order_id: int) -> str:
    """Expire the order if it is still unpaid."""
    expired = Order.objects.filter(pk=order_id, status=Order.UNPAID).update(status=Order.EXPIRED)
    Event.objects.create(order_id=order_id, kind="expired" if expired else "expiry skipped", due_at=_due())
    return "expired" if expired else "already settled"


@shared_task(name="shop.tasks.send_reminder", throws=(ConnectionError,))
def send_reminder(order_id: int) -> str:
    """Send a payment reminder; the mail server refuses every other order's first two attempts."""
    message = current_message()
    tries = message.assigns.get("tries", 0) if message else 0
    if order_id % 2 == 0 and tries < 2:
        Event.objects.create(order_id=order_id, kind="reminder failed", detail=f"try {tries}", due_at=_due())
        raise ConnectionError("mail server busy")
    Event.objects.create(order_id=order_id, kind="reminder sent", detail=f"try {tries}", due_at=_due())
    return "sent"


@shared_task(name="shop.tasks.notify_warehouse")
def notify_warehouse(order_id: int) -> str:
    """Tell the warehouse; its first answer is too slow (past dispatch_timeout) for every third order."""
    import time

    message = current_message()
    tries = message.assigns.get("tries", 0) if message else 0
    if order_id % 3 == 0 and tries == 0:
        time.sleep(5)  # longer than OrderAlarms.dispatch_timeout: the alarm times out and is retried
    Event.objects.create(order_id=order_id, kind="warehouse notified", detail=f"try {tries}", due_at=_due())
    return "notified"


@shared_task(name="shop.tasks.send_loyalty_mail")
def send_loyalty_mail(customer: str) -> str:
    """A mail far in the future: the demo schedules thousands of these to fill the admin."""
    return f"mailed {customer}"


@shared_task(name="shop.tasks.log_stats")
def log_stats() -> dict:
    """An ordinary periodic task (beat_schedule), run by the same beat."""
    counts = {
        status: Order.objects.filter(status=status).count() for status in (Order.UNPAID, Order.PAID, Order.EXPIRED)
    }
    logger.warning("shop stats at %s: %s", timezone.now().isoformat(timespec="seconds"), counts)
    return counts
