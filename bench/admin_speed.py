"""Time the alarm admin's pages at a million rows on PostgreSQL.

    python bench/admin_speed.py [--rows 1000000]
    python bench/admin_speed.py --database NAME --message-id ID [--json]

Creates (and drops first) the database ``csched_bench``, migrates it, fills it with ``--rows`` alarms
in one statement, then requests each page five times with Django's test client as a superuser and
prints the median and worst time and the number of queries. Needs PostgreSQL on 127.0.0.1:5432. The goal:
every page under 300 ms.

With ``--database`` it times the first pages an operator opens (the changelist, a state filter, an exact
search for ``--message-id``, a year drill-down, a change page) on a database another benchmark filled
(``bench/scale.py``), as it is: nothing is created but the admin's own tables and user.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
os.environ["CSCHED_DB"] = "postgres"
if "--database" in sys.argv:
    os.environ["CSCHED_DB_NAME"] = sys.argv[sys.argv.index("--database") + 1]
else:
    os.environ["CSCHED_DB_NAME"] = "csched_bench"


def pages() -> list[tuple[str, str | None]]:
    """Every page an operator opens first; the fill spreads alarms over the next 30 days from now."""
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    base = "/admin/celery_scheduller/alarm/"
    year, month = f"dispatch_at__year={now.year}", f"dispatch_at__month={now.month}"
    return [
        ("changelist (on the schedule, soonest first)", base),
        ("filter status=pending", f"{base}?status=pending"),
        ("filter status=failed + Scheduller", f"{base}?status=failed&scheduller=tests"),
        ("filter status=finished", f"{base}?status=finished"),
        ("filter status=failing", f"{base}?status=failing"),
        ("filter status=all", f"{base}?status=all"),
        ("filter overdue", f"{base}?late=overdue"),
        ("filter unanswered", f"{base}?late=unanswered"),
        ("filter task", f"{base}?task=testapp.record"),
        ("search id, one match", f"{base}?q=bulk-500000"),
        ("search aggregate, 20 matches", f"{base}?q=order-42"),
        ("search correlation id, one match", f"{base}?q=corr-777"),
        ("search, no match", f"{base}?q=nothing-here"),
        ("search aggregate, history included", f"{base}?q=order-42&status=all"),
        ("search aggregate, 5,000 matches", f"{base}?q=big-customer"),
        ("search correlation id, 5,000 matches", f"{base}?q=big-correlation"),
        ("date drill-down: a year", f"{base}?{year}"),
        ("date drill-down: a month", f"{base}?{year}&{month}"),
        ("date drill-down: a day", f"{base}?{year}&{month}&dispatch_at__day={now.day}"),
        ("sort by aggregate", f"{base}?o=4"),
        ("change page", None),
        ("dashboard (20 processes' activity for the hour)", f"{base}dashboard/"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--database", default=None)
    parser.add_argument("--message-id", default=None)
    parser.add_argument("--json", action="store_true", help="print the timings as JSON (with --database)")
    args = parser.parse_args()
    if args.database:
        existing(args)
        return

    import psycopg

    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS csched_bench WITH (FORCE)")
        conn.execute("CREATE DATABASE csched_bench")

    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from celery_scheduller.models import Alarm
    from tests.bulk import fill

    call_command("migrate", verbosity=0)
    started = time.perf_counter()
    fill(args.rows)
    print(f"filled {args.rows:,} alarms in {time.perf_counter() - started:.1f} s")
    # one customer with thousands of alarms, one correlation id shared by as many: searches with many matches
    many = Alarm.objects.filter(pk__in=Alarm.objects.order_by("pk").values("pk")[: min(5_000, args.rows)])
    many.update(aggregate_id="big-customer", correlation_id="big-correlation")
    _activity(20)
    User.objects.create_superuser("bench", "bench@example.com", "bench")
    client = Client()
    client.force_login(User.objects.get(username="bench"))
    some = Alarm.objects.order_by("pk").values_list("pk", flat=True)[args.rows // 2]

    print(f"\n| page ({args.rows:,} rows) | median ms | worst ms | queries |")
    print("|---|---|---|---|")
    for label, url in pages():
        url = url or f"/admin/celery_scheduller/alarm/{some}/change/"
        times = []
        for _ in range(5):
            with CaptureQueriesContext(connection) as queries:
                began = time.perf_counter()
                response = client.get(url)
                times.append((time.perf_counter() - began) * 1000)
            assert response.status_code == 200, (url, response.status_code)
        print(f"| {label} | {statistics.median(times):.0f} | {max(times):.0f} | {len(queries.captured_queries)} |")


def _activity(processes: int) -> None:
    """The dashboard's per-minute rows for the last hour, as ``processes`` beats and workers write them."""
    import datetime as dt

    from django.utils import timezone

    from celery_scheduller import activity
    from celery_scheduller.models import ActivityMinute

    minute = timezone.now().replace(second=0, microsecond=0)
    ActivityMinute.objects.bulk_create(
        ActivityMinute(
            minute=minute - dt.timedelta(minutes=m),
            source=f"host-{p}:{1000 + p}",
            published=500,
            finished=480,
            retried=15,
            failed=5,
            lateness=[300, 150, 40, 10] + [0] * (len(activity.LATENESS_BOUNDS) - 3),
        )
        for m in range(60)
        for p in range(processes)
    )


def time_page(client: object, url: str, repeat: int = 5) -> tuple[float, float, int]:
    """Median and worst ms of ``repeat`` requests of ``url``, and the queries of the last."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    times = []
    for _ in range(repeat):
        with CaptureQueriesContext(connection) as queries:
            began = time.perf_counter()
            response = client.get(url)  # type: ignore[attr-defined]
            times.append((time.perf_counter() - began) * 1000)
        assert response.status_code == 200, (url, response.status_code)
    return statistics.median(times), max(times), len(queries.captured_queries)


def existing(args: argparse.Namespace) -> None:
    """The first pages an operator opens, on a database filled by another benchmark."""
    import datetime as dt
    import json

    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.test import Client

    from celery_scheduller.models import Alarm

    call_command("migrate", verbosity=0)
    if not User.objects.filter(username="bench").exists():
        User.objects.create_superuser("bench", "bench@example.com", "bench")
    client = Client()
    client.force_login(User.objects.get(username="bench"))
    base = "/admin/celery_scheduller/alarm/"
    pk = Alarm.objects.filter(message_id=args.message_id).values_list("pk", flat=True).get()
    year = dt.datetime.now(dt.UTC).year + 1
    found = {}
    for label, url in (
        ("changelist", base),
        ("state filter (pending)", f"{base}?status=pending"),
        ("exact search (message id)", f"{base}?q={args.message_id}"),
        ("year drill-down", f"{base}?dispatch_at__year={year}"),
        ("change page", f"{base}{pk}/change/"),
        ("dashboard", f"{base}dashboard/"),
    ):
        median, worst, queries = time_page(client, url)
        found[label] = {"median_ms": round(median, 1), "worst_ms": round(worst, 1), "queries": queries}
    # what the date hierarchy asked before it read a search's bounds from its matches: MIN and MAX under the
    # search filter, which the planner finds by walking the dispatch_at index (once, 120 s at most)
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = '120s'")
        began = time.perf_counter()
        cursor.execute(
            "SELECT MIN(dispatch_at), MAX(dispatch_at) FROM celery_scheduller_alarm WHERE (message_id = %s OR "
            "aggregate_id = %s OR correlation_id = %s) AND state IN ('pending', 'published')",
            [args.message_id] * 3,
        )
        cursor.fetchall()
        found["search bounds as MIN/MAX (the old query)"] = {
            "median_ms": round((time.perf_counter() - began) * 1000, 1),
            "worst_ms": None,
            "queries": 1,
        }
        cursor.execute("SET statement_timeout = 0")
    print(json.dumps(found) if args.json else "\n".join(f"{k}: {v}" for k, v in found.items()))


if __name__ == "__main__":
    main()
