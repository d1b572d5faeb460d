"""Bounded readings of the alarm tables, shared by the metrics' gauges and the admin's dashboard: each count
stops at a limit, each statement walks one index range."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.db.models import Min
from django.utils import timezone

from . import registry, states
from .models import Alarm


def capped_count(queryset: Any, limit: int) -> int:
    """How many rows ``queryset`` has, counting at most ``limit``."""
    return int(queryset.order_by()[:limit].count())


def names() -> list[str]:
    """The Schedullers served here, then up to 50 others whose alarms are still stored."""
    served = registry.names()
    others = (
        Alarm.objects.exclude(scheduller__in=served).order_by().values_list("scheduller", flat=True).distinct()[:50]
    )
    return list(dict.fromkeys([*served, *others]))


def table_gauges(limit: int, now: dt.datetime | None = None) -> dict[str, dict[str, float]]:
    """Per Scheduller: pending, backlog (due by ``now``, not yet published), the backlog's oldest age in
    seconds (0 without one), in flight, failing, failed; each count at most ``limit``."""
    now = now or timezone.now()
    found: dict[str, dict[str, float]] = {}
    for name in names():
        mine = Alarm.objects.filter(scheduller=name)
        pending = mine.filter(state=states.PENDING)
        backlog = pending.filter(dispatch_at__lte=now)
        oldest = backlog.aggregate(at=Min("dispatch_at"))["at"]
        found[name] = {
            "pending": capped_count(pending, limit),
            "backlog": capped_count(backlog, limit),
            "backlog_oldest_age_seconds": 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds()),
            "in_flight": capped_count(mine.filter(state=states.PUBLISHED), limit),
            "failing": capped_count(mine.filter(failing=True, state__in=states.ACTIVE), limit),
            "failed": capped_count(mine.filter(state=states.FAILED), limit),
        }
    return found
