"""``manage.py demo``: migrate, start a worker and beat, place orders, print what the alarms do."""

import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand

from shop.alarms import pay, place_order
from shop.models import Event

HERE = Path(__file__).resolve().parents[3]


class Command(BaseCommand):
    help = "Run the shop demo: worker and beat as subprocesses, orders expiring, reminders retried."

    def add_arguments(self, parser):
        parser.add_argument("--seconds", type=float, default=45.0, help="how long to run (default 45)")
        parser.add_argument("--orders", type=int, default=4, help="orders to place (default 4)")

    def handle(self, *args, seconds, orders, **options):
        call_command("migrate", verbosity=0)
        user = get_user_model()
        if not user.objects.filter(username="demo").exists():
            user.objects.create_superuser("demo", "demo@example.com", "demo")
        self.stdout.write(f"database: {settings.DATABASES['default']['NAME']}  broker: {settings.CELERY_BROKER_URL}")
        procs = [
            self._start(
                "worker",
                "worker",
                "-l",
                "WARNING",
                "-c",
                "2",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ),
            self._start("beat", "beat", "-S", "celery_scheduller", "-l", "WARNING"),
        ]
        try:
            self._run(seconds, orders)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def _start(self, label, *argv):
        self.stdout.write(f"starting {label}: celery -A shop {' '.join(argv)}")
        return subprocess.Popen([sys.executable, "-m", "celery", "-A", "shop", *argv], cwd=HERE)

    def _run(self, seconds, orders):
        started = time.monotonic()
        placed = []
        seen = Event.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
        next_order_at = started + 2
        while time.monotonic() - started < seconds:
            if len(placed) < orders and time.monotonic() >= next_order_at:
                order = place_order(f"customer {len(placed) + 1}")
                placed.append(order)
                self.stdout.write(
                    self.style.SUCCESS(
                        f"+ placed order {order.pk}: reminder in 5 s, expiry in 20 s (alarms expire-{order.pk}, "
                        f"remind-{order.pk})"
                    )
                )
                if len(placed) == 2:
                    cancelled = pay(order)
                    self.stdout.write(
                        self.style.SUCCESS(f"+ order {order.pk} paid at once: {cancelled} alarms cancelled")
                    )
                next_order_at = time.monotonic() + 2
            for event in Event.objects.filter(pk__gt=seen).order_by("pk"):
                seen = event.pk
                late = ""
                if event.due_at:
                    late = f"  ({(event.at - event.due_at).total_seconds() * 1000:.0f} ms after its time)"
                self.stdout.write(f"  order {event.order_id}: {event.kind} {event.detail}{late}")
            time.sleep(0.2)
        self.stdout.write("demo finished; admin: python example_project/manage.py runserver, user demo / demo")
