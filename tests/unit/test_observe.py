"""Pure parts of the operations code: lateness buckets and their quantiles, answer outcomes, the SVG charts."""

from __future__ import annotations

import datetime as dt

import pytest

from celery_scheduller import activity, dashboard, observe


def test_buckets_and_quantiles() -> None:
    assert activity.bucket_of(0.0) == 0
    assert activity.bucket_of(0.001) == 0
    assert activity.bucket_of(0.0011) == 1
    assert activity.bucket_of(1e9) == len(activity.LATENESS_BOUNDS)
    counts = [0] * (len(activity.LATENESS_BOUNDS) + 1)
    counts[activity.bucket_of(0.0015)] = 98
    counts[activity.bucket_of(0.3)] = 2
    assert activity.quantile(counts, 0.5) == 0.002
    assert activity.quantile(counts, 0.98) == 0.002
    assert activity.quantile(counts, 0.99) == 0.5
    assert activity.quantile([0] * len(counts), 0.5) is None
    counts[-1] = 1000  # beyond the last bound: the last bound
    assert activity.quantile(counts, 0.99) == activity.LATENESS_BOUNDS[-1]


@pytest.mark.parametrize(
    ("status", "error", "outcome"),
    [
        ("ok", None, "ok"),
        ("timeout", None, "timeout"),
        ("error", "RuntimeError: boom", "error"),
        ("error", "WorkerLostError: Worker exited prematurely: signal 9 (SIGKILL)", "lost"),
        ("error", "TimeLimitExceeded: TimeLimitExceeded(2,)", "time_limit"),
        ("error", None, "error"),
    ],
)
def test_outcomes(status: str, error: str | None, outcome: str) -> None:
    assert observe.outcome_of(status, error) == outcome


def test_the_bars_hold_the_counts_and_escape_what_they_show() -> None:
    start = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
    minutes = [start + dt.timedelta(minutes=i) for i in range(3)]
    svg = dashboard.bars("activity", "A <title> & more", minutes, {"published": [3, 0, 5], "failed": [1, 0, 0]})
    assert svg.count('class="bar"') == 3  # nothing drawn for zero
    assert 'data-series="published" data-value="5"' in svg and 'data-series="failed" data-value="1"' in svg
    assert 'aria-label="A &lt;title&gt; &amp; more"' in svg
    lines = dashboard.lines("lateness", "t", minutes, {"p50": [1.0, None, 2.0], "p99": [None, None, None]})
    assert lines.count('class="point"') == 2 and "<polyline" not in lines  # a missing minute breaks the line
