"""What ``scheduller_status`` reports: per Scheduller counts, lateness, in-flight attempts, live beats."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from django.db.models import Count, Max, Min, Sum

from . import registry, states, store, tables
from .conf import settings
from .models import ActivityMinute, Alarm, BeatRecord


def collect(now: dt.datetime) -> dict[str, Any]:
    """The status at ``now`` as JSON-native data."""
    late_before = now - dt.timedelta(milliseconds=settings.LATE_AFTER)
    names = tables.names()
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


def _age(now: dt.datetime, moment: dt.datetime | None) -> float | None:
    return None if moment is None else round((now - moment).total_seconds(), 3)


def _iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    """One condition of ``scheduller_status --check``: its name, the exit bit it sets when it fails, what
    was measured and the limit it was held to."""

    name: str
    bit: int
    ok: bool
    value: float | None
    limit: float | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "exit_bit": self.bit, "value": self.value, "limit": self.limit, "detail": self.detail}


#: The exit bit of each check; the status's exit code is the OR of the failed ones' bits (2 is a usage error).
CHECK_BITS = {"backlog": 1, "failed": 4, "beat": 8, "pruning": 16}


def checks(
    now: dt.datetime,
    *,
    max_backlog_age: float | None = None,
    max_failed: int | None = None,
    failed_within: float = 3600.0,
    max_beat_silence: float | None = None,
    pruning: bool = False,
) -> list[Check]:
    """The conditions asked for, each read with a bounded statement (a probe may run every few seconds)."""
    found = []
    if max_backlog_age is not None:
        age = oldest_backlog_age(now)
        found.append(
            Check(
                "backlog",
                CHECK_BITS["backlog"],
                age <= max_backlog_age,
                age,
                max_backlog_age,
                f"the oldest alarm due and not yet published is {age:.1f}s past its time",
            )
        )
    if max_failed is not None:
        failed = failed_since(now - dt.timedelta(seconds=failed_within))
        found.append(
            Check(
                "failed",
                CHECK_BITS["failed"],
                failed <= max_failed,
                failed,
                max_failed,
                f"{failed} alarms failed in the last {failed_within:g}s",
            )
        )
    if max_beat_silence is not None:
        last = BeatRecord.objects.aggregate(at=Max("last_seen"))["at"]
        silence = None if last is None else max(0.0, (now - last).total_seconds())
        ok = silence is not None and silence <= max_beat_silence
        detail = "no beat has ever recorded itself" if silence is None else f"a beat last recorded {silence:.1f}s ago"
        found.append(Check("beat", CHECK_BITS["beat"], ok, silence, max_beat_silence, detail))
    if pruning:
        kept = retention(now)
        past = kept["oldest_past_seconds"]
        detail = "ended alarms are removed at once (no KEEP_FINISHED)"
        if kept["keep_finished_seconds"] is not None:
            detail = f"{kept['waiting']} ended alarms wait to be pruned" + (
                f", the oldest {past:.1f}s past KEEP_FINISHED" if past is not None else ""
            )
        found.append(Check("pruning", CHECK_BITS["pruning"], not kept["behind"], past, None, detail))
    return found


def oldest_backlog_age(now: dt.datetime) -> float:
    """Seconds since the due time of the oldest pending alarm already due (0 when none is), over every
    Scheduller: one step of the (state, dispatch_at) index."""
    oldest = (
        Alarm.objects.filter(state=states.PENDING, dispatch_at__lte=now)
        .order_by("dispatch_at")
        .values_list("dispatch_at", flat=True)
        .first()
    )
    return 0.0 if oldest is None else round(max(0.0, (now - oldest).total_seconds()), 3)


def failed_since(since: dt.datetime) -> int:
    """Alarms that ended failed since ``since``, as beats and workers counted them (``activity``)."""
    total = ActivityMinute.objects.filter(minute__gte=since - dt.timedelta(minutes=1)).aggregate(n=Sum("failed"))["n"]
    return int(total or 0)


def exit_code(found: list[Check]) -> int:
    """The OR of the failed checks' bits (0: all held)."""
    code = 0
    for check in found:
        if not check.ok:
            code |= check.bit
    return code
