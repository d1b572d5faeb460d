"""``manage.py demo``: migrate, start a worker and beat, place orders, print what the alarms do."""

import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand

from shop.alarms import pay, place_order, seed_loyalty_alarms
from shop.models import Event

HERE = Path(__file__).resolve().parents[3]


class Command(BaseCommand):
    help = "Run the shop demo: worker and beat as subprocesses, orders expiring, reminders retried."

    def add_arguments(self, parser):
        parser.add_argument("--seconds", type=float, default=60.0, help="how long to run; 0: until Ctrl-C")
        parser.add_argument("--orders", type=int, default=6, help="orders to place (default 6)")
        parser.add_argument("--alarms", type=int, default=5_000, help="future alarms to fill the admin with")
        parser.add_argument("--port", type=int, default=8000, help="admin port (default 8000; 0: no admin)")

    def handle(self, *args, seconds, orders, alarms, port, **options):
        call_command("migrate", verbosity=0)
        user = get_user_model()
        if not user.objects.filter(username="demo").exists():
            user.objects.create_superuser("demo", "demo@example.com", "demo")
        self.stdout.write(f"database: {settings.DATABASES['default']['NAME']}  broker: {settings.CELERY_BROKER_URL}")
        seeded = seed_loyalty_alarms(alarms)
        self.stdout.write(f"{seeded} loyalty alarms added over the next 30 days (admin: {alarms} in all)")
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
        if port:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
                    cwd=HERE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            self.stdout.write(
                self.style.SUCCESS(
                    f"admin: http://127.0.0.1:{port}/admin/celery_scheduller/alarm/  (user demo, password demo)"
                )
            )
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
        while not seconds or time.monotonic() - started < seconds:
            if len(placed) < orders and time.monotonic() >= next_order_at:
                order = place_order(f"customer {len(placed) + 1}", warehouse=True)
                placed.append(order)
                self.stdout.write(
                    self.style.SUCCESS(
                        f"+ placed order {order.pk}: warehouse in 1 s, reminder in 5 s, expiry in 20 s "
                        f"(alarms warehouse-{order.pk}, remind-{order.pk}, expire-{order.pk})"
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
        self.stdout.write("demo finished; see it again: python example_project/manage.py demo")
