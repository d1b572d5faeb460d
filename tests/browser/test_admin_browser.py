"""The alarm admin in a real browser: log in, filter, search, open, cancel, dispatch now."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from django.contrib.auth.models import User

from celery_scheduller import Message, states
from celery_scheduller.models import Alarm
from tests.conftest import run_beat
from tests.testapp.alarms import TestAlarms

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("worker")]


def login(page, live_server) -> None:
    User.objects.create_superuser("ops", "ops@example.com", "secret-pw")
    page.goto(f"{live_server.url}/admin/login/?next=/admin/celery_scheduller/alarm/")
    page.fill("#id_username", "ops")
    page.fill("#id_password", "secret-pw")
    page.click("input[type=submit]")
    page.wait_for_selector("#result_list")


def row(page, message_id: str):
    return page.locator("#result_list tbody tr", has=page.locator(f"th a:text-is('{message_id}')"))


def test_operator_filters_searches_opens_cancels_and_dispatches_now(page, live_server, beat, tmp_path):
    alarms = TestAlarms()
    for i in range(3):
        alarms.dispatch(Message.new("testapp.record", {"order_id": i}, id=f"expire-{i}"), f"order-{i}", in_ms=3_600_000)
    alarms.dispatch(Message.new("testapp.record", {"order_id": 9}, id="remind-9"), "order-9", in_ms=7_200_000)
    alarms.dispatch(Message.new("testapp.record", id="done-1"), "order-1", in_ms=0)
    scheduler = beat()
    run_beat(scheduler, lambda: Alarm.objects.filter(message_id="done-1", state=states.FINISHED).exists(), 15, "done-1")

    login(page, live_server)
    # what is on the schedule, soonest first; the finished one is history
    assert page.locator("#result_list tbody th a").all_inner_texts() == ["expire-0", "expire-1", "expire-2", "remind-9"]
    shot = Path(os.environ.get("CSCHED_SCREENSHOT_DIR", tmp_path))
    page.screenshot(path=str(shot / "admin-changelist.png"), full_page=True)

    # filter by state
    page.locator("#changelist-filter a", has_text="finished").first.click()
    page.wait_for_url("**status=finished**")
    assert page.locator("#result_list tbody th a").all_inner_texts() == ["done-1"]

    # search an aggregate
    page.goto(f"{live_server.url}/admin/celery_scheduller/alarm/")
    page.fill("#searchbar", "order-1")
    page.press("#searchbar", "Enter")
    page.wait_for_url("**q=order-1**")
    assert page.locator("#result_list tbody th a").all_inner_texts() == ["expire-1"]  # on the schedule
    page.goto(f"{live_server.url}/admin/celery_scheduller/alarm/?q=order-1&status=all")
    ids = sorted(page.locator("#result_list tbody th a").all_inner_texts())
    assert ids == ["done-1", "expire-1"]

    # open an alarm: its message and attempt history
    page.click("#result_list th a:text-is('done-1')")
    page.wait_for_selector("text=attempt history")
    assert "finished" in page.locator(".field-state").inner_text()
    assert page.locator("table.csched-attempts tbody tr").count() == 1
    assert "ok" in page.locator("table.csched-attempts").inner_text()

    # cancel one through the action
    page.goto(f"{live_server.url}/admin/celery_scheduller/alarm/")
    row(page, "expire-2").locator("input.action-select").check()
    page.select_option("select[name=action]", "cancel")
    page.click("button[name=index]")
    page.wait_for_selector("text=1 alarm(s) cancelled.")
    assert row(page, "expire-2").count() == 0  # off the schedule
    page.goto(f"{live_server.url}/admin/celery_scheduller/alarm/?status=all")
    assert row(page, "expire-2").locator("td.field-state").inner_text() == "cancelled"
    assert Alarm.objects.get(message_id="expire-2").state == states.CANCELLED

    # dispatch one now: beat publishes it, the worker runs it, the page shows it finished
    row(page, "remind-9").locator("input.action-select").check()
    page.select_option("select[name=action]", "dispatch_now")
    page.click("button[name=index]")
    page.wait_for_selector("text=1 alarm(s) dispatched now.")
    started = time.time()
    run_beat(scheduler, lambda: Alarm.objects.filter(message_id="remind-9", state=states.FINISHED).exists(), 15, "run")
    assert time.time() - started < 5
    page.reload()  # ?status=all
    assert row(page, "remind-9").locator("td.field-state").inner_text() == "finished"
    assert row(page, "remind-9").locator("td.field-last_status").inner_text() == "ok"


def test_view_only_user_sees_no_actions(page, live_server):
    from django.contrib.auth.models import Permission

    TestAlarms().dispatch(Message.new("testapp.record", id="look-only"), "agg", in_ms=60_000)
    viewer = User.objects.create_user("viewer", password="secret-pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_alarm"))
    page.goto(f"{live_server.url}/admin/login/?next=/admin/celery_scheduller/alarm/")
    page.fill("#id_username", "viewer")
    page.fill("#id_password", "secret-pw")
    page.click("input[type=submit]")
    page.wait_for_selector("#result_list")
    assert row(page, "look-only").count() == 1
    assert page.locator("select[name=action]").count() == 0
