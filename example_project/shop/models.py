"""Orders and the shop's event log (what the demo prints)."""

from django.db import models


class Order(models.Model):
    """An order that expires unless paid in time."""

    UNPAID, PAID, EXPIRED = "unpaid", "paid", "expired"

    customer = models.CharField(max_length=100)
    status = models.CharField(max_length=10, default=UNPAID)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"order {self.pk} ({self.status})"


class Event(models.Model):
    """Something that happened to an order, with the alarm's due time when one caused it."""

    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=30)
    detail = models.CharField(max_length=200, blank=True, default="")
    due_at = models.DateTimeField(null=True)
    at = models.DateTimeField(auto_now_add=True)
