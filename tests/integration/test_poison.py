"""The poison suite: one bad alarm, response or callback beside healthy alarms due at the same moment.

Each scenario puts its poison beside six healthy alarms (``TestAlarms``, task ``testapp.record``) due
together, on a real worker and beat, and asserts that every healthy alarm runs exactly once, within a
second of its time, and ends finished; that the poison is refused at ``dispatch`` with a clear
``InvalidAlarm`` or ends visible with its reason; and that beat keeps publishing throughout. Run on
PostgreSQL with Redis and with RabbitMQ (tox env ``poison``).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import uuid
from collections.abc import Iterable
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core import checks
from django.db import connection
from django.test import Client, override_settings
from django.utils import timezone

from celery_scheduller import InvalidAlarm, Message, states, store
from celery_scheduller.models import Alarm, AlarmAttempt
from celery_scheduller.store import NewAlarm
from tests.conftest import run_beat, wait_for
from tests.testapp.alarms import PoisonAlarms, TestAlarms
from tests.testapp.models import Answer, Run

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.worker,
    pytest.mark.poison,
    pytest.mark.usefixtures("worker"),
]

HEALTHY = 6
LEAD = dt.timedelta(seconds=1.5)
#: Alarm ids are unique per run: a worker remembers the task ids (id#attempt) it discarded as revoked or
#: expired, and a rerun against a long-lived worker must not meet them.
RUN = uuid.uuid4().hex[:6]


def U(name: str) -> str:
    return f"{RUN}-{name}"


def on_rabbitmq() -> bool:
    from tests.celery_app import app

    return str(app.conf.broker_url).startswith("amqp")


def healthy(at: dt.datetime, prefix: str) -> list[str]:
    """Six healthy alarms due at ``at``."""
    alarms = TestAlarms()
    ids = [U(f"{prefix}-healthy-{n}") for n in range(HEALTHY)]
    alarms.dispatch_many((Message.new("testapp.record", {"n": n}, id=i), "healthy", at) for n, i in enumerate(ids))
    return ids


def poison(task: str, message_id: str, at: dt.datetime, **assigns: Any) -> None:
    PoisonAlarms().dispatch(Message.new(task, id=message_id, assigns=assigns), "poison", at=at)


def forge(message_id: str, at: dt.datetime, task: str = "testapp.record", **fields: Any) -> None:
    """Store a row as no ``dispatch`` would: what a ``save_alarm`` override, an older version or a SQL shell
    may leave. ``fields`` are written over the row after it is inserted (raw SQL for JSON columns)."""
    message = Message.new(task, id=message_id, assigns={"dispatch_at": at})
    store.insert([[NewAlarm(PoisonAlarms.name, message, "poison", 5_000)]], keep_history=True)
    for column, text in fields.items():
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {Alarm._meta.db_table} SET {column} = %s::jsonb WHERE message_id = %s", [text, message_id]
            )


def ended(*ids: str) -> bool:
    return not Alarm.objects.filter(message_id__in=ids, state__in=states.ACTIVE).exists()


def assert_healthy(ids: Iterable[str], at: dt.datetime) -> None:
    """Each ran exactly once, within a second of ``at``, and ended finished."""
    ids = list(ids)
    runs = list(Run.objects.filter(message_id__in=ids).values_list("message_id", "started_at"))
    states_now = list(Alarm.objects.filter(message_id__in=ids).values_list("message_id", "state", "last_response"))
    assert sorted(message_id for message_id, _ in runs) == sorted(ids), (runs, states_now)
    for message_id, started in runs:
        assert dt.timedelta(0) <= started - at < dt.timedelta(seconds=1), (message_id, started - at)
    assert set(Alarm.objects.filter(message_id__in=ids).values_list("state", flat=True)) == {states.FINISHED}


def failed_with(message_id: str, *words: str) -> dict[str, Any]:
    """The alarm is failed and its recorded error names each of ``words`` (its raw_request is not read:
    a poisoned one may be more than this process decodes)."""
    alarm = Alarm.objects.values("state", "last_response", "attempt", "callback_failures").get(message_id=message_id)
    assert alarm["state"] == states.FAILED, alarm
    # given up by the package (a failing service_responded keeps the task's response beside its reason), or
    # failed with the error as its response
    error = alarm["last_response"].get("reason") or alarm["last_response"]["error"]
    for word in words:
        assert word in error, error
    return alarm


# -- poison in what a task returns ------------------------------------------------------------------


def test_a_task_returning_or_raising_text_with_nul_ends_with_it_stored_safely(beat):
    at = timezone.now() + LEAD
    ids = healthy(at, "nul")
    poison("testapp.poison_text", U("nul-return"), at)
    PoisonAlarms().dispatch(Message.new("testapp.poison_text", {"mode": "raise"}, id=U("nul-raise")), "poison", at=at)
    run_beat(beat(), lambda: ended(*ids, U("nul-return"), U("nul-raise")), 30, "every alarm ended")
    assert_healthy(ids, at)
    returned = Alarm.objects.get(message_id=U("nul-return"))
    assert returned.state == states.FINISHED and returned.attempt == 1
    assert returned.last_response["value"] == repr("bad byte \x00 in the result")
    assert "value stored as its repr" in returned.last_response["note"] and "NUL" in returned.last_response["note"]
    raised = Alarm.objects.get(message_id=U("nul-raise"))
    assert raised.state == states.FINISHED
    assert raised.last_response["error"] == "ValueError: bad byte \ufffd in the reply"
    assert AlarmAttempt.objects.get(message_id=U("nul-raise")).error == "ValueError: bad byte \ufffd in the reply"


# -- poison in what service_responded returns ---------------------------------------------------------


def test_a_retry_with_a_lone_surrogate_fails_its_alarm_alone_on_the_worker_and_the_timeout_path(beat):
    at = timezone.now() + LEAD
    ids = healthy(at, "surrogate")
    poison("testapp.record", U("surrogate-worker"), at, poison="surrogate_retry")
    # the stale queue has no consumer: beat answers the attempt as a timeout, in its callback threads
    poison("testapp.stale", U("surrogate-timeout"), at, poison="surrogate_retry", timeout_ms=500)
    run_beat(beat(), lambda: ended(*ids, U("surrogate-worker"), U("surrogate-timeout")), 40, "every alarm ended")
    assert_healthy(ids, at)
    for message_id in (U("surrogate-worker"), U("surrogate-timeout")):  # decided 4 times, the task run once
        assert failed_with(message_id, "failed 4 times in a row", "lone surrogate")["attempt"] == 1
    assert Answer.objects.filter(message_id=U("surrogate-timeout"), status="timeout").count() == 4


def test_a_retry_with_a_5_mb_message_is_refused_and_its_alarm_fails(beat):
    at = timezone.now() + LEAD
    ids = healthy(at, "huge")
    poison("testapp.record", U("huge-retry"), at, poison="huge_retry")
    run_beat(beat(), lambda: ended(*ids, U("huge-retry")), 40, "every alarm ended")
    assert_healthy(ids, at)
    failed_with(U("huge-retry"), "failed 4 times in a row", "more than CELERY_SCHEDULLER_MAX_PAYLOAD")
    assert len(json.dumps(Alarm.objects.get(message_id=U("huge-retry")).assigns)) < 1_000  # never stored


def test_a_callback_that_always_raises_fails_after_the_cap_with_a_growing_back_off_and_can_be_restarted(beat):
    at = timezone.now() + LEAD
    ids = healthy(at, U("raising"))
    poison("testapp.record", U("raising"), at, poison="raise")
    run_beat(beat(), lambda: ended(*ids, U("raising")), 40, "every alarm ended")
    assert_healthy(ids, at)
    failed_with(U("raising"), "failed 4 times in a row", "RuntimeError: service_responded is broken")
    attempts = AlarmAttempt.objects.filter(message_id=U("raising")).order_by("responded_at", "pk")
    history = [decision.split(")")[0] for decision in attempts.values_list("decision", flat=True)]
    assert history[:3] == ["service_responded failed (1", "service_responded failed (2", "service_responded failed (3"]
    assert history[3].startswith("failed: service_responded failed 4 times in a ro")
    assert (
        Run.objects.filter(message_id=U("raising"), task="record").count() == 1
    )  # the task once, its callback 4 times
    decided = list(attempts.order_by("responded_at").values_list("responded_at", flat=True))
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(decided)]
    assert gaps[2] > gaps[0]  # 250-500 ms, then 500-1000, then 1-2 s (ERROR_BACKOFF 500)
    assert PoisonAlarms().restart(U("raising"))
    restarted = Alarm.objects.get(message_id=U("raising"))
    assert restarted.state == states.PENDING and restarted.callback_failures == 0


def test_a_slow_callback_on_a_timeout_delays_only_its_own_alarm(beat):
    at = timezone.now() + dt.timedelta(seconds=0.5)
    poison("testapp.stale", U("sleepy"), at, poison="sleep_on_timeout", sleep=4, timeout_ms=300)
    later = at + dt.timedelta(seconds=1.5)  # due while the first call sleeps
    ids = healthy(later, U("sleepy"))
    with override_settings(CELERY_SCHEDULLER_CALLBACK_BUDGET=1_000):
        run_beat(beat(), lambda: ended(*ids, U("sleepy")), 60, "every alarm ended")
    assert_healthy(ids, later)
    failed_with(U("sleepy"), "failed 4 times in a row", "ran longer than CALLBACK_BUDGET (1000 ms)")


# -- poison in what is stored ---------------------------------------------------------------------------


def test_deep_nesting_is_refused_at_dispatch_and_a_deep_row_fails_alone_in_beat(beat):
    deep: Any = "leaf"
    for _ in range(990):
        deep = [deep]
    deep_json = '{"deep": ' + "[" * 990 + '"leaf"' + "]" * 990 + "}"  # json.dumps would recurse too deep here
    with pytest.raises(InvalidAlarm, match=r"raw_request\['deep'\].*nested deeper than 32 levels"):
        TestAlarms().dispatch(Message.new("testapp.record", {"deep": deep}), "x", in_ms=0)
    at = timezone.now() + LEAD
    ids = healthy(at, "deep")
    forge(U("deep-row"), at, raw_request=deep_json)
    run_beat(beat(), lambda: ended(*ids, U("deep-row")), 30, "every alarm ended")
    assert_healthy(ids, at)
    failed_with(U("deep-row"), "the stored message cannot be read", "RecursionError")
    assert not Run.objects.filter(message_id=U("deep-row")).exists()


def test_a_large_raw_request_is_delivered_on_either_broker_and_large_assigns_fit_the_broker_or_are_refused(beat):
    at = timezone.now() + LEAD
    ids = healthy(at, "large")
    PoisonAlarms().dispatch(Message.new("testapp.record", {"blob": "x" * 200_000}, id=U("large-raw")), "poison", at=at)
    big_assigns = Message.new("testapp.record", id=U("large-assigns"), assigns={"blob": "y" * 200_000})
    if on_rabbitmq():
        with pytest.raises(InvalidAlarm, match="more than the broker carries in a message header"):
            PoisonAlarms().dispatch(big_assigns, "poison", at=at)
        forge(U("large-assigns"), at, assigns=json.dumps({"blob": "y" * 200_000, "dispatch_at": None}))
    else:
        PoisonAlarms().dispatch(big_assigns, "poison", at=at)
    run_beat(beat(), lambda: ended(*ids, U("large-raw"), U("large-assigns")), 30, "every alarm ended")
    assert_healthy(ids, at)
    assert Alarm.objects.get(message_id=U("large-raw")).state == states.FINISHED
    assert len(Run.objects.get(message_id=U("large-raw")).kwargs["blob"]) == 200_000
    if on_rabbitmq():
        failed_with(U("large-assigns"), "cannot be published", "more than the broker takes in one header")
        assert not Run.objects.filter(message_id=U("large-assigns")).exists()
    else:
        assert Alarm.objects.get(message_id=U("large-assigns")).state == states.FINISHED


# -- tasks beat does not know ------------------------------------------------------------------------------


def test_a_task_only_workers_know_is_delivered_and_one_no_worker_knows_comes_back_as_an_error(beat):
    from tests.celery_app import app

    assert "testapp.worker_only" not in app.tasks  # deployed to the workers, not to beat or this process
    at = timezone.now() + LEAD
    ids = healthy(at, "unknown")
    for message_id, task in ((U("new-task"), "testapp.worker_only"), (U("no-task"), "testapp.nowhere")):
        message = Message.new(task, id=message_id, assigns={"dispatch_at": at})
        store.insert([[NewAlarm(PoisonAlarms.name, message, "poison", 5_000)]], keep_history=True)
    run_beat(beat(), lambda: ended(*ids, U("new-task"), U("no-task")), 30, "every alarm ended")
    assert_healthy(ids, at)
    assert Alarm.objects.get(message_id=U("new-task")).state == states.FINISHED
    assert Run.objects.filter(message_id=U("new-task")).count() == 1
    unknown = Answer.objects.get(message_id=U("no-task"))
    assert (unknown.status, unknown.error) == ("error", "NotRegistered: no task named 'testapp.nowhere' on this worker")
    assert Alarm.objects.get(message_id=U("no-task")).state == states.FINISHED  # the application said OK


# -- the worker trusts the header, not the task id -------------------------------------------------------


def test_a_forged_task_id_on_the_hard_time_limit_path_does_not_answer_the_real_alarm(beat):
    from tests.celery_app import app

    TestAlarms().dispatch(Message.new("testapp.sleep", {"seconds": 3}, id=U("real")), "agg", in_ms=0)
    scheduler = beat()
    run_beat(scheduler, lambda: Run.objects.filter(message_id=U("real")).exists(), 15, "the real task to start")
    # a message with the real delivery's task id and no header, which hits its hard time limit
    task_id = f"{U('real')}#1.{Alarm.objects.get(message_id=U('real')).pk}"
    app.send_task("testapp.hang", task_id=task_id, kwargs={})
    # and one with a header this project did not sign
    app.send_task("testapp.record", task_id=task_id, kwargs={}, headers={"celery_scheduller": "0" * 32 + ".{}"})
    wait_for(lambda: Run.objects.filter(task="hang").exists(), 10, "the forged task to run")
    answer = run_beat(scheduler, lambda: Answer.objects.filter(message_id=U("real")).first(), 15, "the real answer")
    assert (answer.status, answer.value) == ("ok", "slept")  # not a fake TimeLimitExceeded
    assert Answer.objects.filter(message_id=U("real")).count() == 1


# -- the admin under bad URLs and at scale -----------------------------------------------------------------


@pytest.fixture
def admin_client() -> Client:
    User.objects.create_superuser("admin", "a@example.com", "pw")
    client = Client()
    client.login(username="admin", password="pw")
    return client


@pytest.mark.parametrize(
    "query",
    [
        "dispatch_at__day=4",
        "dispatch_at__month=12",
        "dispatch_at__month=12&dispatch_at__day=4",
        "dispatch_at__year=2030&dispatch_at__day=4",
        "dispatch_at__year=2030&dispatch_at__month=13",
        "dispatch_at__year=2030&dispatch_at__month=2&dispatch_at__day=30",
        "dispatch_at__year=abc",
        "dispatch_at__year=99999999999999999999",
        "dispatch_at__year=2030&dispatch_at__month=-1",
        "state=nonsense",
        "o=99",
        "q=%00",
        "p=-1",
    ],
)
def test_no_query_string_makes_the_alarm_changelist_fail(admin_client, query):
    TestAlarms().dispatch(Message.new("testapp.record", id="seen"), "agg", in_ms=60_000)
    response = admin_client.get(f"/admin/celery_scheduller/alarm/?{query}")
    assert response.status_code in (200, 302), (query, response.status_code)


def test_an_action_on_more_alarms_than_the_bound_is_refused_and_a_smaller_one_reports_what_it_did(
    admin_client, monkeypatch
):
    from celery_scheduller import admin

    monkeypatch.setattr(admin, "ACTION_LIMIT", 50)
    monkeypatch.setattr(admin, "ACTION_BATCH", 20)
    now = timezone.now() + dt.timedelta(hours=1)
    alarms = TestAlarms()
    alarms.dispatch_many((Message.new("testapp.record", id=U(f"bulk-{n}")), "big", now) for n in range(40))
    alarms.dispatch_many((Message.new("testapp.record", id=U(f"small-{n}")), "small", now) for n in range(11))
    url = "/admin/celery_scheduller/alarm/"
    data = {"action": "cancel", "select_across": "1", "index": "0", "_selected_action": ["1"]}
    response = admin_client.post(url, data, follow=True)
    assert "More than 50 alarms are selected: nothing was changed" in response.content.decode()  # 51
    assert Alarm.objects.filter(state=states.PENDING).count() == 51
    response = admin_client.post(f"{url}?q=small", data, follow=True)  # an aggregate of 11
    assert "11 alarm(s) cancelled." in response.content.decode()
    assert Alarm.objects.filter(state=states.CANCELLED).count() == 11


# -- configuration as the Celery app holds it ---------------------------------------------------------------


def test_pickle_allowed_on_the_celery_app_itself_is_reported():
    from tests.celery_app import app

    app.conf.accept_content = ["pickle", "json"]
    try:
        found = [message.id for message in checks.run_checks() if message.id.startswith("celery_scheduller")]
    finally:
        app.conf.changes.pop("accept_content")  # back to what Django's settings say, not a copy of it
    assert "celery_scheduller.E001" in found


def test_a_max_payload_set_beyond_what_a_rabbitmq_header_carries_is_reported():
    from tests.celery_app import app

    app.conf.broker_url = "amqp://guest:guest@127.0.0.1:5672//"
    try:
        with override_settings(CELERY_SCHEDULLER_MAX_PAYLOAD=200_000):
            found = [m for m in checks.run_checks() if m.id == "celery_scheduller.W002"]
        with override_settings(CELERY_SCHEDULLER_MAX_PAYLOAD=100_000):
            fits = [m for m in checks.run_checks() if m.id == "celery_scheduller.W002"]
    finally:
        app.conf.changes.pop("broker_url")
    assert len(found) == 1 and "122,880 bytes" in found[0].msg and not fits
