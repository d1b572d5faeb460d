"""What ``scheduller_status`` reports: per Scheduller counts, lateness, in-flight attempts, live beats."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.db.models import Count, Min

from . import registry, states, store
from .conf import settings
from .models import Alarm, BeatRecord


def collect(now: dt.datetime) -> dict[str, Any]:
    """The status at ``now`` as JSON-native data."""
    late_before = now - dt.timedelta(milliseconds=settings.LATE_AFTER)
    names = list(dict.fromkeys([*registry.names(), *_names_in_table()]))
    schedullers: dict[str, Any] = {}
    for name in names:
        counts = {state: 0 for state, _ in states.CHOICES}
        for row in Alarm.objects.filter(scheduller=name).values("state").annotate(n=Count("pk")).order_by():
            counts[row["state"]] = row["n"]
        pending = Alarm.objects.filter(scheduller=name, state=states.PENDING)
        overdue = pending.filter(dispatch_at__lt=late_before).aggregate(n=Count("pk"), oldest=Min("dispatch_at"))
        published = Alarm.objects.filter(scheduller=name, state=states.PUBLISHED)
        flight = published.aggregate(oldest_deadline=Min("deadline"))
        unanswered = published.filter(deadline__lt=now).count()
        next_due = pending.filter(dispatch_at__gte=now).aggregate(at=Min("dispatch_at"))["at"]
        failing = Alarm.objects.filter(scheduller=name, failing=True, state__in=states.ACTIVE).count()
        schedullers[name] = {
            "served": name in registry.classes(),
            "counts": counts,
            "overdue": overdue["n"],
            "oldest_overdue_seconds": _age(now, overdue["oldest"]),
            "in_flight": counts[states.PUBLISHED],
            "oldest_deadline": _iso(flight["oldest_deadline"]),
            "past_deadline": unanswered,
            "next_due": _iso(next_due),
            "failing": failing,
        }
    alive_after = now - dt.timedelta(milliseconds=3 * settings.integer("BEAT_RECORD_INTERVAL"))
    beats = [
        {
            "name": beat.name,
            "started_at": _iso(beat.started_at),
            "last_seen": _iso(beat.last_seen),
            "windows": beat.windows,
            "published": beat.published,
            "timeouts": beat.timeouts,
        }
        for beat in BeatRecord.objects.filter(last_seen__gte=alive_after).order_by("name")
    ]
    return {"now": _iso(now), "schedullers": schedullers, "beats": beats, "retention": retention(now)}


#: ``retention`` counts at most this many ended alarms waiting to be pruned
RETENTION_COUNT_LIMIT = 100_000


def retention(now: dt.datetime) -> dict[str, Any]:
    """What pruning has yet to remove: the ended alarms kept longer than KEEP_FINISHED (counted up to
    RETENTION_COUNT_LIMIT) and how far past it the oldest of them is. A pruner that keeps pace leaves at
    most a PRUNE_INTERVAL of them; more, for longer, means it is behind."""
    keep = settings.keep_finished()
    if keep is None:
        return {"keep_finished_seconds": None, "waiting": 0, "oldest_past_seconds": None, "behind": False}
    waiting, oldest = store.prune_backlog(now - keep, RETENTION_COUNT_LIMIT)
    past = None if oldest is None else round((now - keep - oldest).total_seconds(), 3)
    # a pass every PRUNE_INTERVAL removes everything past the cut-off: twice that, and a minute, is behind
    allowed = 2 * settings.integer("PRUNE_INTERVAL") / 1000 + 60
    return {
        "keep_finished_seconds": keep.total_seconds(),
        "waiting": waiting,
        "oldest_past_seconds": past,
        "behind": past is not None and past > allowed,
    }


def worst_overdue(status: dict[str, Any]) -> float:
    """The oldest overdue age in seconds over every Scheduller (0 when none is overdue)."""
    ages = [s["oldest_overdue_seconds"] or 0.0 for s in status["schedullers"].values()]
    return max(ages, default=0.0)


def _names_in_table() -> list[str]:
    # names of Schedullers no longer configured whose alarms are still stored; served by nobody
    served = registry.names()
    return list(
        Alarm.objects.exclude(scheduller__in=served).order_by().values_list("scheduller", flat=True).distinct()[:50]
    )


def _age(now: dt.datetime, moment: dt.datetime | None) -> float | None:
    return None if moment is None else round((now - moment).total_seconds(), 3)


def _iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
