"""The Tasks-API path: a receipt written against Django's Tasks framework (``@task``, ``.using(run_after=…)``,
``get_result``), delivered by the same engine as the alarms of ``shop.alarms``."""

try:
    from django.tasks import task
except ImportError:
    from django_tasks import task

from .models import Event


@task
def send_receipt(order_id: int) -> str:
    """Mail the receipt of a paid order."""
    Event.objects.create(order_id=order_id, kind="receipt sent", detail="Django Tasks")
    return f"receipt for order {order_id}"
