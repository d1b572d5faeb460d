"""``manage.py scheduller_prune``: remove ended alarms kept longer than KEEP_FINISHED (or --older-than)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from celery_scheduller import store
from celery_scheduller.conf import settings


class Command(BaseCommand):
    help = "Remove ended alarms (finished, failed, cancelled) and their attempt history, in batches."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than", type=float, help="seconds; default: CELERY_SCHEDULLER_KEEP_FINISHED")
        parser.add_argument("--batch", type=int, default=None, help="rows per statement (default PRUNE_BATCH)")

    def handle(self, *args: Any, older_than: float | None, batch: int | None, **options: Any) -> None:
        keep = dt.timedelta(seconds=older_than) if older_than is not None else settings.keep_finished()
        if keep is None:
            raise CommandError("KEEP_FINISHED is not set (ended alarms are removed at once); pass --older-than.")
        if keep < dt.timedelta(0):
            raise CommandError("--older-than must not be negative")
        limit = batch or settings.integer("PRUNE_BATCH")
        if limit <= 0:
            raise CommandError("--batch must be positive")
        before = timezone.now() - keep
        total = 0
        while True:
            pruned = store.prune(before, limit)
            total += pruned
            if pruned < limit:
                break
        self.stdout.write(f"pruned {total} ended alarms that ended before {before.isoformat(timespec='seconds')}")
