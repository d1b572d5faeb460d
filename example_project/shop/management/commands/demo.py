"""``manage.py demo``: migrate, start a worker and beat, place orders, print what the alarms do.

Only the demo's own story is printed, each line labelled with its case (on time, retried, timed out and
retried, cancelled, expired); Celery's own output goes to log files under the shop's var folder.
"""

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand

from celery_scheduller import states
from celery_scheduller.models import Alarm
from shop.alarms import pay, place_order, seed_loyalty_alarms
from shop.models import Event

HERE = Path(__file__).resolve().parents[3]


class Command(BaseCommand):
    help = "Run the shop demo: worker and beat as subprocesses, orders expiring, reminders retried."

    def add_arguments(self, parser):
        parser.add_argument(
            "--seconds",
            type=float,
            default=60.0,
            help="the longest it runs (it ends when the orders' alarms have); 0: until Ctrl-C",
        )
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
        log = Path(settings.VAR) / f"{label}.log"
        self.stdout.write(f"starting {label}: celery -A shop {' '.join(argv)}  (its output: {log})")
        with open(log, "w") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "shop", *argv], cwd=HERE, stdout=out, stderr=subprocess.STDOUT
            )

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
                        f"order {order.pk} placed: warehouse call in 1 s, payment reminder in 5 s, expiry in 20 s"
                    )
                )
                if len(placed) == 2:
                    cancelled = pay(order)
                    self.stdout.write(
                        self.style.SUCCESS(
                            f"order {order.pk}: [cancelled] paid at once, its {cancelled} alarms cancelled"
                        )
                    )
                    if settings.TASKS_AVAILABLE:
                        self.stdout.write(f"order {order.pk}: receipt enqueued through Django's Tasks API, in 3 s")
                next_order_at = time.monotonic() + 2
            for event in Event.objects.filter(pk__gt=seen).order_by("pk"):
                seen = event.pk
                story = _story(event)
                if story:
                    self.stdout.write(f"order {event.order_id}: {story}")
            if len(placed) == orders and not _on_schedule(placed) and time.monotonic() - next_order_at > 6:
                break  # every order's alarms have ended (and a slow first call has had time to report)
            time.sleep(0.2)
        python = os.path.relpath(sys.executable)
        python = sys.executable if python.startswith("..") else python
        manage = os.path.relpath(HERE / "manage.py")
        self.stdout.write(f"demo finished; see it again: {shlex.join([python, manage, 'demo'])}")


def _on_schedule(orders) -> bool:
    keys = [f"order-{order.pk}" for order in orders]
    return Alarm.objects.filter(aggregate_id__in=keys, state__in=states.ACTIVE).exists()


def _story(event) -> str:
    """One event of an order's alarms, with the case it shows."""
    late = ""
    if event.due_at:
        late = f", {(event.at - event.due_at).total_seconds() * 1000:.0f} ms after its time"
    tries = event.detail.removeprefix("try ")
    if event.kind == "warehouse notified":
        if event.due_at and (event.at - event.due_at).total_seconds() > 3:
            return (
                f"[timed out] the slow first warehouse call finished{late}, after its 3 s dispatch_timeout: "
                "its answer is ignored, the retry already answered"
            )
        case = "[on time]" if tries == "0" else "[timed out and retried]"
        return f"{case} warehouse notified (try {tries}{late})"
    if event.kind == "reminder failed":
        return f"[retried] reminder failed: mail server busy (try {tries}{late})"
    if event.kind == "reminder sent":
        case = "[on time]" if tries == "0" else "[retried]"
        return f"{case} reminder sent (try {tries}{late})"
    if event.kind == "retry scheduled":
        case = "[timed out and retried]" if ": timeout;" in event.detail else "[retried]"
        return f"{case} retry scheduled: {event.detail}"
    if event.kind == "expired":
        return f"[expired] unpaid after 20 s: order expired{late}"
    if event.kind == "expiry skipped":
        return f"[on time] expiry ran{late}: the order was already settled"
    if event.kind == "receipt sent":
        return "[Django Tasks] receipt sent: send_receipt.using(run_after=…).enqueue(…), delivered by beat"
    if event.kind == "paid":
        return ""  # told when the order was paid
    return f"{event.kind} {event.detail}{late}"
