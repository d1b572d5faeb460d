"""``manage.py place_orders N``: place N orders (paying every fifth at once) and print their ids."""

import datetime as dt
import json

from django.core.management.base import BaseCommand

from shop.alarms import pay, place_order


class Command(BaseCommand):
    help = "Place orders with their alarms; every fifth order is paid at once (its alarms cancelled)."

    def add_arguments(self, parser):
        parser.add_argument("count", type=int)
        parser.add_argument("--expire-ms", type=int, default=20_000)
        parser.add_argument("--remind-ms", type=int, default=5_000)

    def handle(self, *args, count, expire_ms, remind_ms, **options):
        placed, paid = [], []
        for i in range(count):
            order = place_order(
                f"customer {i}",
                expire_after=dt.timedelta(milliseconds=expire_ms),
                remind_after=dt.timedelta(milliseconds=remind_ms),
            )
            placed.append(order.pk)
            if i % 5 == 4:
                pay(order)
                paid.append(order.pk)
        self.stdout.write(json.dumps({"placed": placed, "paid": paid}))
