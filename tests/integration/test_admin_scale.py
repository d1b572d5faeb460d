"""The changelist at 100,000 rows: a bounded number of queries, none of them a full-table COUNT."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.bulk import fill

pytestmark = pytest.mark.django_db(transaction=True)

PAGES = [
    "/admin/celery_scheduller/alarm/",
    "/admin/celery_scheduller/alarm/?status=pending",
    "/admin/celery_scheduller/alarm/?status=failed&scheduller=tests",
    "/admin/celery_scheduller/alarm/?status=failing",
    "/admin/celery_scheduller/alarm/?status=all",
    "/admin/celery_scheduller/alarm/?task=testapp.record&late=overdue",
    "/admin/celery_scheduller/alarm/?q=order-42",
    "/admin/celery_scheduller/alarm/?q=bulk-99999",
    "/admin/celery_scheduller/alarm/?o=4",
]


def hierarchy_pages() -> list[str]:
    from django.utils import timezone

    now = timezone.now()
    base = f"/admin/celery_scheduller/alarm/?dispatch_at__year={now.year}"
    return [
        base,
        f"{base}&dispatch_at__month={now.month}",
        f"{base}&dispatch_at__month={now.month}&dispatch_at__day={now.day}",
    ]


def test_changelist_queries_are_bounded_at_100k_rows(admin_client):
    fill(100_000)
    for url in PAGES + hierarchy_pages():
        with CaptureQueriesContext(connection) as queries:
            response = admin_client.get(url)
        assert response.status_code == 200, url
        statements = [q["sql"].upper() for q in queries.captured_queries]
        assert len(statements) <= 12, (url, statements)
        counts = [s for s in statements if "COUNT(" in s or "DISTINCT" in s]
        assert counts == [], (url, counts)
    page = admin_client.get("/admin/celery_scheduller/alarm/?q=order-42&status=all")
    assert page.content.count(b'class="action-select"') == 2  # order-42 and order-50042


def test_change_page_shows_the_message_pretty_printed(admin_client):
    from celery_scheduller import Message
    from celery_scheduller.models import Alarm
    from tests.testapp.alarms import TestAlarms

    TestAlarms().dispatch(Message.new("testapp.record", {"order_id": 7}, id="pretty"), "agg", in_ms=1000)
    page = admin_client.get(f"/admin/celery_scheduller/alarm/{Alarm.objects.get(message_id='pretty').pk}/change/")
    assert page.status_code == 200
    assert b"&quot;order_id&quot;: 7" in page.content
    assert b'name="_save"' not in page.content  # read-only: no save buttons
    assert admin_client.post(page.request["PATH_INFO"], {"state": "cancelled"}).status_code == 403
    assert Alarm.objects.get(message_id="pretty").state == "pending"


def test_the_change_page_is_titled_as_a_view_and_shows_times_to_the_second_and_readable_json(admin_client):
    import datetime as dt

    from celery_scheduller import Message
    from celery_scheduller.models import Alarm
    from tests.testapp.alarms import TestAlarms

    at = dt.datetime(2031, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    message = Message.new("testapp.record", id="readable").assign("when", at)
    TestAlarms().dispatch(message, "agg", at=at)
    page = admin_client.get(f"/admin/celery_scheduller/alarm/{Alarm.objects.get(message_id='readable').pk}/change/")
    content = page.content.decode()
    assert "| View alarm |" in content and "Change alarm" not in content
    assert "2031-05-06 07:08:09" in content
    assert "&quot;when&quot;: &quot;2031-05-06T07:08:09+00:00&quot;" in content and "$datetime" not in content
    listing = admin_client.get("/admin/celery_scheduller/alarm/").content.decode()
    assert "2031-05-06 07:08:09" in listing


def test_a_search_finds_its_matches_by_their_indexes_then_reads_them_by_primary_key(admin_client, monkeypatch):
    """No query orders or bounds the table under the search filter (which the planner may answer by walking
    the dispatch_at index: half a minute at ten million rows without statistics); a search with more matches
    than SEARCH_MATCHES is filtered as before, with the same rows shown."""
    from celery_scheduller import admin

    fill(20_000)
    url = "/admin/celery_scheduller/alarm/?q=order-42&status=all"
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(url)

    def column(name: str) -> str:
        return f"{connection.ops.quote_name('celery_scheduller_alarm')}.{connection.ops.quote_name(name)}"

    statements = [q["sql"] for q in queries.captured_queries if "celery_scheduller_alarm" in q["sql"]]
    searched = [s for s in statements if f"{column('aggregate_id')} = " in s]
    assert len(searched) == 1, statements
    assert f"{column('message_id')} = " in searched[0] and f"{column('correlation_id')} = " in searched[0]
    assert "LIMIT 10001" in searched[0] and "ORDER BY" not in searched[0] and "MIN(" not in searched[0]
    assert any(f"{column('id')} IN (" in s for s in statements)
    assert page.content.count(b'class="action-select"') == 1 and b"bulk-42<" in page.content
    monkeypatch.setattr(admin, "SEARCH_MATCHES", 0)
    broad = admin_client.get(url)
    assert broad.content.count(b'class="action-select"') == 1 and b"bulk-42<" in broad.content
