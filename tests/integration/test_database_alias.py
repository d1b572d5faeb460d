"""CELERY_SCHEDULLER_DATABASE, and the routers without it: the package's every statement, transaction and
connection on one database, with a real worker whose settings name it."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from django.core import checks
from django.db import connections
from django.test.utils import CaptureQueriesContext

from celery_scheduller import Message, db, states
from celery_scheduller.models import Alarm, AlarmAttempt, BeatRecord
from celery_scheduller.wire import QUEUE_KEY
from tests.conftest import run_beat, start_worker, stop
from tests.testapp.alarms import TestAlarms
from tests.testapp.models import Answer, Run

pytestmark = [pytest.mark.django_db(databases=["default", "alarms"], transaction=True), pytest.mark.worker]

PACKAGE_TABLES = ("celery_scheduller_",)


def _package_statements(captured: CaptureQueriesContext) -> list[str]:
    return [query["sql"] for query in captured.captured_queries if any(t in query["sql"] for t in PACKAGE_TABLES)]


@pytest.fixture
def alarms_worker(settings, tmp_path: Path):
    """A worker whose settings name the ``alarms`` database, on a queue of its own."""
    settings.CELERY_SCHEDULLER_DATABASE = "alarms"
    queue = f"{settings.CSCHED_TEST_QUEUE}.alarmsdb"
    proc = start_worker(
        tmp_path / "worker.log",
        "-c",
        "1",
        "-Q",
        queue,
        "-n",
        f"csched-alarmsdb-{os.getpid()}@%h",
        env={"CSCHED_ALARM_DATABASE": "alarms"},
    )
    try:
        yield queue
    finally:
        stop(proc)


def test_the_setting_puts_every_statement_of_dispatch_beat_and_worker_on_that_database(alarms_worker, beat):
    assert db.alias() == "alarms"
    alarms = TestAlarms()
    on_queue = {QUEUE_KEY: alarms_worker}
    with CaptureQueriesContext(connections["default"]) as on_default:
        alarms.dispatch(Message.new("testapp.record", id="db-ok", assigns=on_queue), "agg", in_ms=0)
        retried = {**on_queue, "retries_left": 1, "retry_ms": 50}
        alarms.dispatch(Message.new("testapp.record", id="db-retry", assigns=retried), "agg", in_ms=0)
        later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        alarms.dispatch_many(
            [(Message.new("testapp.record", id=f"db-later-{n}", assigns=on_queue), "later", later) for n in range(3)]
        )
        assert alarms.reschedule("db-later-0", in_ms=7_200_000)
        assert alarms.cancel("db-later-1")
        assert alarms.cancel_aggregate("later") == 2
        scheduler = beat()
        run_beat(
            scheduler,
            lambda: Alarm.objects.filter(message_id__in=["db-ok", "db-retry"], state=states.FINISHED).count() == 2,
            30,
            "both alarms answered by the worker on the alarms database",
        )
    assert _package_statements(on_default) == []  # not one package statement on the default database
    # the rows are on "alarms" (kept as history in the tests' settings), none on "default"
    assert set(Alarm.objects.using("alarms").values_list("message_id", "state")) >= {
        ("db-ok", states.FINISHED),
        ("db-retry", states.FINISHED),
    }
    assert AlarmAttempt.objects.using("alarms").filter(message_id="db-retry").count() == 2
    assert Answer.objects.filter(message_id="db-retry").count() == 2  # the callback's rows: the project's own
    assert BeatRecord.objects.using("alarms").exists()
    for model in (Alarm, AlarmAttempt, BeatRecord):
        assert not model._base_manager.db_manager("default").exists()
    # the tasks and callbacks wrote the project's own rows where the project keeps them
    assert Run.objects.filter(message_id__in=["db-ok", "db-retry"]).count() == 3


def test_without_the_setting_the_routers_choose_and_the_check_reports_unmigrated_tables(settings):
    settings.DATABASE_ROUTERS = ["tests.routers.AlarmsRouter"]
    assert db.alias() == "alarms"
    TestAlarms().dispatch(Message.new("testapp.record", id="routed"), "agg", in_ms=60_000)
    assert Alarm.objects.using("alarms").filter(message_id="routed").exists()
    assert not Alarm._base_manager.db_manager("default").filter(message_id="routed").exists()
    assert [m.id for m in checks.run_checks() if m.id == "celery_scheduller.E007"] == []
    settings.DATABASE_ROUTERS = ["tests.routers.NoAlarmTablesRouter"]
    found = [m for m in checks.run_checks() if m.id == "celery_scheduller.E007"]
    assert len(found) == 1 and "'default'" in found[0].msg


def test_an_alias_that_is_not_in_databases_is_refused_by_the_check(settings):
    settings.CELERY_SCHEDULLER_DATABASE = "nowhere"
    found = [m.msg for m in checks.run_checks() if m.id == "celery_scheduller.E005"]
    assert any("CELERY_SCHEDULLER_DATABASE must be None or an alias in DATABASES" in msg for msg in found)
