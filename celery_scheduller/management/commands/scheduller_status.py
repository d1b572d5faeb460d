"""``manage.py scheduller_status``: what is pending, late and in flight, per Scheduller; a health check."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from celery_scheduller import status


class Command(BaseCommand):
    help = (
        "Counts by state, overdue alarms and the oldest overdue age, in-flight attempts, next due and live "
        "beats, per Scheduller. Exits with 1 when an alarm is overdue longer than --max-overdue seconds."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.add_argument("--max-overdue", type=float, default=60.0, help="seconds (default 60)")

    def handle(self, *args: Any, max_overdue: float, **options: Any) -> None:
        if max_overdue < 0:
            raise CommandError("--max-overdue must not be negative")
        report = status.collect(timezone.now())
        worst = status.worst_overdue(report)
        report["healthy"] = worst <= max_overdue
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2))
        else:
            self._print(report)
        if not report["healthy"]:
            raise CommandError(f"alarms overdue for {worst:.1f}s (more than {max_overdue:g}s)", returncode=1)

    def _print(self, report: dict[str, Any]) -> None:
        for name, info in report["schedullers"].items():
            counts = ", ".join(f"{state} {n}" for state, n in info["counts"].items())
            served = "" if info["served"] else "  (not in CELERY_SCHEDULLER_CLASSES: nobody delivers these)"
            self.stdout.write(f"{name}{served}")
            self.stdout.write(f"  {counts}")
            self.stdout.write(
                f"  failing {info['failing']} (retried after an error or a timeout), failed {info['counts']['failed']}"
            )
            oldest = info["oldest_overdue_seconds"]
            self.stdout.write(f"  overdue {info['overdue']}" + (f", oldest {oldest:.1f}s" if oldest else ""))
            self.stdout.write(
                f"  in flight {info['in_flight']}, oldest deadline {info['oldest_deadline'] or '—'}, "
                f"past deadline {info['past_deadline']}"
            )
            self.stdout.write(f"  next due {info['next_due'] or '—'}")
        kept = report["retention"]
        if kept["keep_finished_seconds"] is not None:
            past = kept["oldest_past_seconds"]
            self.stdout.write(
                f"retention: ended alarms kept {kept['keep_finished_seconds']:g}s; waiting to be pruned "
                f"{kept['waiting']}"
                + (f", the oldest {past:.1f}s past KEEP_FINISHED" if past is not None else "")
                + ("  (pruning is behind)" if kept["behind"] else "")
            )
        if not report["beats"]:
            self.stdout.write("beats: none seen recently")
        for beat in report["beats"]:
            windows = ", ".join(f"{k} until {v}" for k, v in beat["windows"].items()) or "nothing loaded yet"
            self.stdout.write(
                f"beat {beat['name']}: last seen {beat['last_seen']}, published {beat['published']}, "
                f"timeouts {beat['timeouts']}, loaded: {windows}"
            )
