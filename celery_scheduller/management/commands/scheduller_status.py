"""``manage.py scheduller_status``: what is pending, late and in flight, per Scheduller; a health check."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from celery_scheduller import status
from celery_scheduller.conf import settings

#: The exit status of a usage error (a bad option value), apart from every check's bit.
USAGE_ERROR = 2


class Command(BaseCommand):
    help = (
        "Counts by state, overdue alarms and the oldest overdue age, in-flight attempts, next due and live "
        "beats, per Scheduller. Exits with 1 when an alarm is overdue longer than --max-overdue seconds. "
        "With --check, only the conditions asked for are read (each with one bounded statement: a probe) and "
        "the exit status is the OR of the failed ones' bits: 1 backlog, 4 failed alarms, 8 no beat, "
        "16 pruning behind."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.add_argument(
            "--max-overdue",
            "--max-backlog-age",
            dest="max_overdue",
            type=float,
            default=None,
            help="seconds an alarm may stay due and unpublished (default 60; with --check, unchecked unless given)",
        )
        parser.add_argument(
            "--check", action="store_true", help="a health check: read and print only the conditions given"
        )
        parser.add_argument("--max-failed", type=int, help="--check: alarms that may fail within --failed-within")
        parser.add_argument(
            "--failed-within", type=float, default=3600.0, help="--check: seconds counted for --max-failed (3600)"
        )
        parser.add_argument("--max-beat-silence", type=float, help="--check: seconds since the last record of any beat")
        parser.add_argument("--pruning", action="store_true", help="--check: fail when pruning is behind KEEP_FINISHED")

    def handle(self, *args: Any, **options: Any) -> None:
        self._validate(options)
        if options["check"]:
            self._check(options)
            return
        max_overdue = 60.0 if options["max_overdue"] is None else options["max_overdue"]
        report = status.collect(timezone.now())
        worst = status.worst_overdue(report)
        report["healthy"] = worst <= max_overdue
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2))
        else:
            self._print(report)
        if not report["healthy"]:
            raise CommandError(f"alarms overdue for {worst:.1f}s (more than {max_overdue:g}s)", returncode=1)

    def _validate(self, options: dict[str, Any]) -> None:
        for name in ("max_overdue", "max_failed", "max_beat_silence"):
            if options[name] is not None and options[name] < 0:
                raise CommandError(f"--{name.replace('_', '-')} must not be negative", returncode=USAGE_ERROR)
        if options["failed_within"] <= 0:
            raise CommandError("--failed-within must be positive", returncode=USAGE_ERROR)
        record = settings.integer("BEAT_RECORD_INTERVAL") / 1000
        silence = options["max_beat_silence"]
        if silence is not None and silence <= record:
            raise CommandError(
                f"--max-beat-silence must be more than BEAT_RECORD_INTERVAL ({record:g}s): a live beat records "
                "itself that often",
                returncode=USAGE_ERROR,
            )
        asked = [options["max_overdue"], options["max_failed"], silence, options["pruning"] or None]
        if options["check"] and all(value is None for value in asked):
            raise CommandError(
                "--check needs at least one condition: --max-backlog-age, --max-failed, --max-beat-silence or "
                "--pruning",
                returncode=USAGE_ERROR,
            )

    def _check(self, options: dict[str, Any]) -> None:
        found = status.checks(
            timezone.now(),
            max_backlog_age=options["max_overdue"],
            max_failed=options["max_failed"],
            failed_within=options["failed_within"],
            max_beat_silence=options["max_beat_silence"],
            pruning=options["pruning"],
        )
        code = status.exit_code(found)
        if options["json"]:
            report = {"healthy": code == 0, "exit_code": code, "checks": {c.name: c.to_json() for c in found}}
            self.stdout.write(json.dumps(report, indent=2))
        else:
            for check in found:
                self.stdout.write(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
        if code:
            failed = ", ".join(check.name for check in found if not check.ok)
            raise CommandError(f"unhealthy: {failed}", returncode=code)

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
