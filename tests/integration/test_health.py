"""``scheduller_status --check``: each condition's exit bit, as a probe or a cron job sees it (a real
``manage.py`` process), and the admin's dashboard numbers against the rows."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import pytest
from django.db import connection
from django.utils import timezone

from celery_scheduller import Message, activity, status
from celery_scheduller.models import ActivityMinute, Alarm, BeatRecord
from tests.conftest import ROOT
from tests.testapp.alarms import TestAlarms

pytestmark = pytest.mark.django_db(transaction=True)


def manage(*argv: str) -> subprocess.CompletedProcess[str]:
    """``django-admin scheduller_status …`` on the test database, in a process of its own."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "CSCHED_DB_NAME": str(connection.settings_dict["NAME"]),
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.run(
        [sys.executable, "-m", "django", "scheduller_status", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _beat_seen(seconds_ago: float) -> None:
    now = timezone.now()
    BeatRecord.objects.update_or_create(
        name="beat-a", defaults={"started_at": now, "last_seen": now - dt.timedelta(seconds=seconds_ago)}
    )


def _due(message_id: str, seconds_ago: float) -> None:
    Alarm.objects.create(
        message_id=message_id,
        scheduller="tests",
        task_name="testapp.record",
        aggregate_id="agg",
        dispatch_at=timezone.now() - dt.timedelta(seconds=seconds_ago),
    )


def test_each_condition_sets_its_own_exit_bit() -> None:
    _beat_seen(1)
    every = ["--check", "--max-backlog-age", "60", "--max-failed", "0", "--max-beat-silence", "30", "--pruning"]
    healthy = manage(*every)
    assert healthy.returncode == 0, healthy.stderr
    lines = healthy.stdout.splitlines()
    assert lines[:2] == [
        "ok   backlog: the oldest alarm due and not yet published is 0.0s past its time",
        "ok   failed: 0 alarms failed in the last 3600s",
    ]
    assert lines[2].startswith("ok   beat: a beat last recorded 1.") and lines[2].endswith("s ago")
    assert lines[3:] == ["ok   pruning: 0 ended alarms wait to be pruned"]

    _due("stuck", 120)  # due two minutes ago, nobody published it
    backlog = manage(*every, "--json")
    assert backlog.returncode == status.CHECK_BITS["backlog"] == 1
    report = json.loads(backlog.stdout)
    assert report["healthy"] is False and report["checks"]["backlog"]["value"] >= 120
    assert manage("--check", "--max-backlog-age", "600").returncode == 0  # a looser probe passes

    minute = timezone.now().replace(second=0, microsecond=0)
    ActivityMinute.objects.create(minute=minute, source="worker:1", failed=3)
    assert manage("--check", "--max-failed", "0").returncode == 4
    assert manage("--check", "--max-failed", "3").returncode == 0
    assert manage("--check", "--max-failed", "0", "--failed-within", "60").returncode == 4

    _beat_seen(90)
    assert manage("--check", "--max-beat-silence", "60").returncode == 8
    BeatRecord.objects.all().delete()
    silent = manage("--check", "--max-beat-silence", "60")
    assert silent.returncode == 8 and "no beat has ever recorded itself" in silent.stdout

    # an ended alarm kept well past KEEP_FINISHED (an hour in the tests): pruning is behind
    Alarm.objects.create(
        message_id="old",
        scheduller="tests",
        task_name="testapp.record",
        aggregate_id="agg",
        dispatch_at=timezone.now() - dt.timedelta(days=2),
        state="finished",
        finished_at=timezone.now() - dt.timedelta(days=1),
    )
    assert manage("--check", "--pruning").returncode == 16

    # several fail together: their bits add up
    everything = manage(*every)
    assert everything.returncode == 1 | 4 | 8 | 16
    assert [line.split(":")[0] for line in everything.stdout.splitlines()] == [
        "FAIL backlog",
        "FAIL failed",
        "FAIL beat",
        "FAIL pruning",
    ]


def test_bad_options_are_usage_errors_with_their_own_exit_status() -> None:
    nothing = manage("--check")
    assert nothing.returncode == 2 and "--check needs at least one condition" in nothing.stderr
    short = manage("--check", "--max-beat-silence", "5")
    assert short.returncode == 2 and "more than BEAT_RECORD_INTERVAL (10s)" in short.stderr
    negative = manage("--check", "--max-failed", "-1")
    assert negative.returncode == 2 and "--max-failed must not be negative" in negative.stderr


def test_the_report_without_check_keeps_its_exit_status() -> None:
    _due("late", 120)
    assert manage("--max-overdue", "60").returncode == 1
    assert manage("--max-overdue", "600").returncode == 0


def test_the_dashboard_shows_what_the_rows_hold(admin_client) -> None:
    now = timezone.now()
    alarms = TestAlarms()
    for i in range(7):
        alarms.dispatch(Message.new("testapp.record", id=f"soon-{i}"), "agg", in_ms=5 * 60_000 + i * 1000)
    alarms.dispatch(Message.new("testapp.record", id="later"), "agg", in_ms=6 * 3_600_000)  # past the chart
    _due("behind", 30)
    minute = now.replace(second=0, microsecond=0)
    late = [0] * (len(activity.LATENESS_BOUNDS) + 1)
    late[activity.bucket_of(0.0015)] = 98
    late[activity.bucket_of(0.3)] = 2
    ActivityMinute.objects.create(minute=minute, source="beat:1", published=40)
    ActivityMinute.objects.create(minute=minute, source="worker:1", finished=30, retried=6, failed=2, lateness=late)
    ActivityMinute.objects.create(
        minute=minute - dt.timedelta(minutes=5), source="worker:2", finished=4, lateness=[1] + [0] * 16
    )
    ActivityMinute.objects.create(minute=minute - dt.timedelta(hours=2), source="worker:2", finished=99)  # too old
    BeatRecord.objects.create(name="beat-on-host-1", started_at=now, last_seen=now)

    page = admin_client.get("/admin/celery_scheduller/alarm/dashboard/")
    assert page.status_code == 200
    html = page.content.decode()
    for key, value in {"due": 7, "published": 40, "finished": 34, "retried": 6, "failed": 2, "now_backlog": 1}.items():
        assert f'data-key="{key}">{value}<' in html, key
    assert 'data-key="now_pending">9<' in html and "beat-on-host-1" in html
    assert html.count('data-chart="') == 3
    # p50 of the minute is its 2 ms bucket, p99 the 500 ms bucket (100 starts: 98 fast, 2 slow)
    assert 'data-series="p50" data-value="2"' in html and 'data-series="p99" data-value="500"' in html
    # the due bars hold the seven alarms due in five to six minutes
    assert sum(int(v) for v in _values(html, "due")) == 7

    changelist = admin_client.get("/admin/celery_scheduller/alarm/").content.decode()
    assert 'href="/admin/celery_scheduller/alarm/dashboard/"' in changelist


def _values(html: str, series: str) -> list[str]:
    import re

    return re.findall(rf'data-series="{series}" data-value="(\d+)"', html)


def test_the_dashboard_needs_the_view_permission(client) -> None:
    from django.contrib.auth.models import User

    User.objects.create_user("nobody", password="pw", is_staff=True)
    client.login(username="nobody", password="pw")
    assert client.get("/admin/celery_scheduller/alarm/dashboard/").status_code == 403


def test_the_web_view_serves_the_table_gauges(client) -> None:
    TestAlarms().dispatch(Message.new("testapp.record", id="gauged"), "agg", in_ms=3_600_000)
    body = client.get("/metrics").content.decode()
    assert 'celery_scheduller_pending{scheduller="tests"} 1.0' in body
    assert 'celery_scheduller_backlog{scheduller="tests"} 0.0' in body


def test_a_metrics_port_needs_a_valid_port() -> None:
    from django.test import override_settings

    from celery_scheduller.conf import settings
    from celery_scheduller.exceptions import ConfigurationError

    with override_settings(CELERY_SCHEDULLER_METRICS_PORT=70_000), pytest.raises(ConfigurationError, match="TCP port"):
        settings.port("METRICS_PORT")
