"""The admin's dashboard: what an operator opens first, read with bounded statements and drawn as SVG on the
server (no script, no CDN).

- due per minute for the next ``DUE_HOURS`` hours: the due times of at most ``DUE_LIMIT`` pending alarms,
  soonest first (one range of the (state, dispatch_at) index); past the limit the chart says where it stops;
- published, finished, retried and failed per minute for the last hour, and task start lateness p50 / p99
  per minute: the activity rows beats and workers write (``activity``), at most one per process and minute;
- the backlog (due, not yet published; counted up to ``COUNT_LIMIT``) and the age of its oldest alarm, in
  flight, failing, failed, and the beats alive with their last record.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from html import escape
from typing import Any

from django.utils import timezone

from . import activity, states, status, tables
from .conf import settings
from .models import ActivityMinute, Alarm, BeatRecord

DUE_HOURS = 3
DUE_LIMIT = 20_000
COUNT_LIMIT = 100_000
SERIES = ("published", "finished", "retried", "failed")
COLOURS = {"published": "#417690", "finished": "#4caf50", "retried": "#f0a030", "failed": "#c0392b", "due": "#79aec8"}


@dataclasses.dataclass
class Dashboard:
    now: dt.datetime
    #: (minute, due alarms) for the next DUE_HOURS, every minute present
    due: list[tuple[dt.datetime, int]]
    #: the due time of the last alarm read when DUE_LIMIT was reached, else None
    due_cut: dt.datetime | None
    #: (minute, {series: count}) for the last hour, every minute present
    activity: list[tuple[dt.datetime, dict[str, int]]]
    #: (minute, p50 seconds or None, p99 seconds or None)
    lateness: list[tuple[dt.datetime, float | None, float | None]]
    counts: dict[str, int]
    backlog_age: float
    beats: list[dict[str, Any]]


def _minute(moment: dt.datetime) -> dt.datetime:
    return moment.replace(second=0, microsecond=0)


def read(now: dt.datetime | None = None) -> Dashboard:
    """Everything the page shows, at ``now``."""
    now = now or timezone.now()
    start = _minute(now)
    until = now + dt.timedelta(hours=DUE_HOURS)
    times = list(
        Alarm.objects.filter(state=states.PENDING, dispatch_at__gt=now, dispatch_at__lte=until)
        .order_by("dispatch_at")
        .values_list("dispatch_at", flat=True)[:DUE_LIMIT]
    )
    due_counts: dict[dt.datetime, int] = {}
    for moment in times:
        key = _minute(moment)
        due_counts[key] = due_counts.get(key, 0) + 1
    due = [(minute, due_counts.get(minute, 0)) for minute in _minutes(start, DUE_HOURS * 60 + 1)]
    since = start - dt.timedelta(minutes=59)
    rows = ActivityMinute.objects.filter(minute__gte=since, minute__lte=start).values_list(
        "minute", *SERIES, "lateness"
    )
    per_minute: dict[dt.datetime, dict[str, int]] = {}
    buckets: dict[dt.datetime, list[int]] = {}
    width = len(activity.LATENESS_BOUNDS) + 1
    for minute, *values, lateness in rows:
        key = _minute(minute)
        sums = per_minute.setdefault(key, dict.fromkeys(SERIES, 0))
        for name, value in zip(SERIES, values, strict=True):
            sums[name] += value
        summed = buckets.setdefault(key, [0] * width)
        for index, count in enumerate((lateness or [])[:width]):
            summed[index] += int(count)
    minutes = list(_minutes(since, 60))
    pending = Alarm.objects.filter(state=states.PENDING)
    counts = {
        "pending": tables.capped_count(pending, COUNT_LIMIT),
        "backlog": tables.capped_count(pending.filter(dispatch_at__lte=now), COUNT_LIMIT),
        "in_flight": tables.capped_count(Alarm.objects.filter(state=states.PUBLISHED), COUNT_LIMIT),
        "failing": tables.capped_count(Alarm.objects.filter(failing=True, state__in=states.ACTIVE), COUNT_LIMIT),
        "failed": tables.capped_count(Alarm.objects.filter(state=states.FAILED), COUNT_LIMIT),
    }
    alive_after = now - dt.timedelta(milliseconds=3 * settings.integer("BEAT_RECORD_INTERVAL"))
    beats = [
        {
            "name": beat.name,
            "last_seen": beat.last_seen,
            "age": max(0.0, (now - beat.last_seen).total_seconds()),
            "published": beat.published,
            "timeouts": beat.timeouts,
        }
        for beat in BeatRecord.objects.filter(last_seen__gte=alive_after).order_by("name")[:50]
    ]
    return Dashboard(
        now=now,
        due=due,
        due_cut=times[-1] if len(times) >= DUE_LIMIT else None,
        activity=[(minute, per_minute.get(minute, dict.fromkeys(SERIES, 0))) for minute in minutes],
        lateness=[
            (minute, activity.quantile(buckets[minute], 0.5), activity.quantile(buckets[minute], 0.99))
            if minute in buckets
            else (minute, None, None)
            for minute in minutes
        ],
        counts=counts,
        backlog_age=status.oldest_backlog_age(now),
        beats=beats,
    )


def _minutes(start: dt.datetime, count: int) -> list[dt.datetime]:
    return [start + dt.timedelta(minutes=index) for index in range(count)]


# -- drawing ----------------------------------------------------------------------------------------------

WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 900, 180, 48, 22, 10


def _frame(top: float, unit: str, labels: list[tuple[int, str]], slots: int, bottom: str = "0") -> list[str]:
    """Axes: the top value on the left (and ``bottom`` at the bottom), time labels under the slots."""
    plot_w, plot_h = WIDTH - LEFT - 8, HEIGHT - BOTTOM - TOP
    parts = [
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - 8}" y2="{TOP + plot_h}" stroke="#999"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" stroke="#999"/>',
        f'<text x="{LEFT - 4}" y="{TOP + 9}" text-anchor="end" font-size="10">{escape(_number(top))}{unit}</text>',
        f'<text x="{LEFT - 4}" y="{TOP + plot_h}" text-anchor="end" font-size="10">{escape(bottom)}</text>',
    ]
    for index, text in labels:
        x = LEFT + plot_w * (index + 0.5) / slots
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - 6}" text-anchor="middle" font-size="10">{escape(text)}</text>')
    return parts


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:.3g}"


def _svg(name: str, parts: list[str], title: str) -> str:
    return (
        f'<svg class="csched-chart" data-chart="{name}" role="img" aria-label="{escape(title)}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" preserveAspectRatio="none" '
        f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'
    )


def _time_labels(minutes: list[dt.datetime], every: int) -> list[tuple[int, str]]:
    local = [timezone.localtime(minute) if timezone.is_aware(minute) else minute for minute in minutes]
    return [(index, moment.strftime("%H:%M")) for index, moment in enumerate(local) if index % every == 0]


def bars(name: str, title: str, minutes: list[dt.datetime], series: dict[str, list[int]]) -> str:
    """Stacked bars per minute, one colour per series; each bar's <title> says its minute and counts."""
    slots = len(minutes)
    top = max([sum(values) for values in zip(*series.values(), strict=True)] or [0]) or 1
    plot_w, plot_h = WIDTH - LEFT - 8, HEIGHT - BOTTOM - TOP
    width = plot_w / slots
    parts = _frame(top, "", _time_labels(minutes, 30 if slots > 90 else 10), slots)
    for index, minute in enumerate(minutes):
        base = 0
        for key, values in series.items():
            value = values[index]
            if not value:
                continue
            height = plot_h * value / top
            y = TOP + plot_h - plot_h * (base + value) / top
            label = f"{timezone.localtime(minute):%H:%M} {key} {value}"
            parts.append(
                f'<rect class="bar" data-series="{key}" data-value="{value}" x="{LEFT + index * width:.2f}" '
                f'y="{y:.2f}" width="{max(width - 1, 1):.2f}" height="{height:.2f}" fill="{COLOURS[key]}">'
                f"<title>{escape(label)}</title></rect>"
            )
            base += value
    return _svg(name, parts, title)


def lines(name: str, title: str, minutes: list[dt.datetime], series: dict[str, list[float | None]]) -> str:
    """Lines per minute (milliseconds, on a logarithmic scale from 0.5 ms: a p50 of 1 ms and a p99 of 500 ms
    both show), one per series; a minute without a value breaks the line."""
    slots = len(minutes)
    top = max([value for values in series.values() for value in values if value is not None] or [0])
    top = max(top, 10.0)
    plot_w, plot_h = WIDTH - LEFT - 8, HEIGHT - BOTTOM - TOP
    parts = _frame(top, " ms", _time_labels(minutes, 10), slots, bottom="0.5 ms")

    def height(value: float) -> float:  # 0.5 ms at the axis, so the 1 ms bucket stands above it
        return plot_h * math.log10(max(value, 0.5) / 0.5) / math.log10(top / 0.5)

    for key, colour in zip(series, ("#417690", "#c0392b"), strict=False):
        points: list[str] = []
        runs: list[list[str]] = [points]
        for index, value in enumerate(series[key]):
            if value is None:
                points = []
                runs.append(points)
                continue
            x = LEFT + plot_w * (index + 0.5) / slots
            y = TOP + plot_h - height(value)
            points.append(f"{x:.1f},{y:.1f}")
            parts.append(
                f'<circle class="point" data-series="{key}" data-value="{value:g}" cx="{x:.1f}" cy="{y:.1f}" r="2" '
                f'fill="{colour}"><title>{escape(f"{timezone.localtime(minutes[index]):%H:%M} {key} {value:g} ms")}'
                "</title></circle>"
            )
        for run in runs:
            if len(run) > 1:
                parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{" ".join(run)}"/>')
    return _svg(name, parts, title)


def charts(board: Dashboard) -> dict[str, str]:
    """The page's three charts as SVG markup."""
    due_minutes = [minute for minute, _count in board.due]
    minutes = [minute for minute, _sums in board.activity]
    return {
        "due": bars(
            "due",
            f"Alarms due per minute, next {DUE_HOURS} hours",
            due_minutes,
            {"due": [count for _minute, count in board.due]},
        ),
        "activity": bars(
            "activity",
            "Published, finished, retried and failed per minute, last hour",
            minutes,
            {key: [sums[key] for _minute, sums in board.activity] for key in SERIES},
        ),
        "lateness": lines(
            "lateness",
            "Task start lateness per minute (p50, p99), last hour",
            minutes,
            {
                "p50": [None if p50 is None else p50 * 1000 for _minute, p50, _p99 in board.lateness],
                "p99": [None if p99 is None else p99 * 1000 for _minute, _p50, p99 in board.lateness],
            },
        ),
    }


def totals(board: Dashboard) -> dict[str, int]:
    """The last hour's sums per series, and the next hours' due alarms."""
    found = {key: sum(sums[key] for _minute, sums in board.activity) for key in SERIES}
    found["due"] = sum(count for _minute, count in board.due)
    return found
