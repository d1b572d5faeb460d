"""Django's Tasks framework on this engine (``AlarmTaskBackend``), modelled on Django's own backend tests
(``tests/tasks/``): enqueue, results, errors, context, async tasks, deferral, retries, signals, validation;
on a real worker (Django 6's ``django.tasks``, or the ``django-tasks`` backport on Django 5.2)."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from django.db import transaction
from django.utils import timezone

from celery_scheduller.models import Alarm, TaskRecord
from tests.conftest import run_beat, wait_for
from tests.testapp import jobs
from tests.testapp.models import Run

try:
    from django.tasks import TaskResultStatus, default_task_backend, task_backends
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
except ImportError:
    from django_tasks import TaskResultStatus, default_task_backend, task_backends
    from django_tasks.exceptions import InvalidTaskError as InvalidTask
    from django_tasks.exceptions import TaskResultDoesNotExist

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.worker,
    pytest.mark.usefixtures("worker", "close_sync_thread_connections"),
]


def is_finished(result):
    """A condition for ``wait_for`` / ``run_beat``: the result, refreshed, has finished."""

    def done() -> bool:
        result.refresh()
        return result.is_finished

    return done


def finished(result, timeout: float = 15) -> None:
    wait_for(is_finished(result), timeout, f"task result {result.id}")


def test_the_backend_declares_what_it_supports():
    backend = default_task_backend
    assert (backend.supports_defer, backend.supports_get_result) == (True, True)
    assert (backend.supports_async_task, backend.supports_priority) == (True, True)


def test_enqueue_runs_the_task_now_and_get_result_reads_it():
    result = jobs.add.enqueue(2, 3)
    assert result.status == TaskResultStatus.READY and result.enqueued_at is not None
    assert (result.args, result.kwargs, result.backend) == ([2, 3], {}, "default")
    finished(result)
    assert result.status == TaskResultStatus.SUCCESSFUL and result.return_value == 5
    assert result.started_at is not None and result.finished_at >= result.started_at
    assert result.last_attempted_at is not None and result.attempts == 1 and len(result.worker_ids) == 1
    fetched = jobs.add.get_result(result.id)
    assert fetched.return_value == 5 and fetched.task.func == jobs.add.func
    assert asyncio.run(default_task_backend.aget_result(result.id)).return_value == 5


def test_a_failing_task_is_failed_with_the_error_class_path_and_traceback():
    result = jobs.explode.enqueue("boom")
    finished(result)
    assert result.status == TaskResultStatus.FAILED
    assert result.errors[0].exception_class_path == "builtins.ValueError"
    assert result.errors[0].exception_class is ValueError
    assert "ValueError: boom" in result.errors[0].traceback
    with pytest.raises(ValueError, match="Task failed"):
        result.return_value  # noqa: B018 - Django's property raises for a failed task


def test_context_attempt_and_async_tasks():
    with_context = jobs.attempt_number.enqueue()
    doubled = jobs.double.enqueue(21)
    finished(with_context)
    finished(doubled)
    assert with_context.return_value == 1
    assert doubled.return_value == 42


def test_run_after_stores_an_alarm_that_beat_delivers_at_that_time(beat):
    run_after = timezone.now() + dt.timedelta(seconds=1.5)
    result = jobs.add.using(run_after=run_after).enqueue(1, 1)
    alarm = Alarm.objects.get(aggregate_id=result.id)
    assert alarm.scheduller == "django_tasks" and alarm.dispatch_at == run_after
    assert result.status == TaskResultStatus.READY
    run_beat(beat(), is_finished(result), 15, "the deferred task")
    assert result.status == TaskResultStatus.SUCCESSFUL and result.return_value == 2
    assert result.started_at >= run_after


def test_enqueue_is_transactional():
    with pytest.raises(RuntimeError), transaction.atomic():
        now = jobs.add.enqueue(40, 2)
        later = jobs.add.using(run_after=timezone.now() + dt.timedelta(seconds=1)).enqueue(40, 2)
        raise RuntimeError("the view failed")
    assert not TaskRecord.objects.filter(pk__in=[now.id, later.id]).exists()
    assert not Alarm.objects.filter(aggregate_id__in=[now.id, later.id]).exists()
    runs = Run.objects.filter(task="jobs.add", kwargs={"a": 40, "b": 2})
    assert not runs.exists()


def test_a_retry_policy_runs_a_failed_task_again_with_a_back_off(beat):
    result = jobs.flaky.enqueue(succeed_on=3)
    scheduler = beat()
    run_beat(scheduler, is_finished(result), 20, "the retried task")
    assert result.status == TaskResultStatus.SUCCESSFUL and result.return_value == 3
    assert result.attempts == 3 and len(result.errors) == 2
    assert "RuntimeError: attempt 1 failed" in result.errors[0].traceback
    exhausted = jobs.flaky.enqueue(succeed_on=10)
    run_beat(scheduler, is_finished(exhausted), 20, "the task to give up")
    assert exhausted.status == TaskResultStatus.FAILED and exhausted.attempts == 3


def test_started_and_finished_signals_are_sent_in_the_worker_and_enqueued_here():
    from celery_scheduller import task_backend

    seen = []
    task_backend.task_enqueued.connect(lambda sender, task_result, **kw: seen.append(task_result.id), weak=False)
    try:
        result = jobs.add.enqueue(1, 2)
    finally:
        task_backend.task_enqueued.receivers.clear()
    finished(result)
    assert seen == [result.id]
    signals = {
        (run.task, run.kwargs["status"])
        for run in Run.objects.filter(task__startswith="signal:")
        if run.kwargs["id"] == result.id
    }
    assert signals == {("signal:started", "RUNNING"), ("signal:finished", "SUCCESSFUL")}


def test_results_expire_and_unknown_ids_do_not_exist():
    result = jobs.add.enqueue(3, 4)
    finished(result)
    TaskRecord.objects.filter(pk=result.id).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    with pytest.raises(TaskResultDoesNotExist):
        jobs.add.get_result(result.id)
    with pytest.raises(TaskResultDoesNotExist):
        default_task_backend.get_result("no-such-id")
    from celery_scheduller import store

    assert store.prune_task_records(timezone.now(), 100) == 1


def test_invalid_tasks_are_refused_where_they_are_made():
    with pytest.raises(InvalidTask, match="Queue 'nope' is not valid"):
        jobs.add.using(queue_name="nope")
    with pytest.raises(InvalidTask, match="priority"):
        jobs.add.using(priority=101)
    with pytest.raises(InvalidTask, match="aware"):
        jobs.add.using(run_after=dt.datetime(2030, 1, 1))  # noqa: DTZ001 - the bad input under test


def test_priority_and_queue_map_to_celery():
    backend = task_backends["default"]
    assert backend.celery_queue("default") is None and backend.celery_queue("other") == "other"
    high, low = backend.celery_priority(100), backend.celery_priority(-100)
    assert {high, low} == {0, 9} and backend.celery_priority(0) is None
    result = jobs.add.using(priority=50).enqueue(5, 5)
    finished(result)
    assert result.return_value == 10


def signals_of(result) -> set[tuple[str, str, str]]:
    """``(signal, status, sender class)`` of the started/finished signals the worker sent for ``result``, once
    ``task_finished`` is among them (it is sent just after the result is saved, and recorded by a receiver)."""

    def sent() -> set[tuple[str, str, str]]:
        return {
            (run.task, run.kwargs["status"], run.kwargs["sender"])
            for run in Run.objects.filter(task__startswith="signal:")
            if run.kwargs["id"] == result.id
        }

    return wait_for(lambda: {s for s in sent() if s[0] == "signal:finished"} and sent(), 10, "task_finished")


BASE_ENDINGS = [
    ("SystemExit", "builtins.SystemExit", "SystemExit: asked to exit"),
    ("exit", "builtins.SystemExit", "SystemExit: 1"),
    ("KeyboardInterrupt", "builtins.KeyboardInterrupt", "KeyboardInterrupt"),
]


@pytest.mark.parametrize(("kind", "class_path", "last_line"), BASE_ENDINGS)
def test_a_task_that_raises_a_base_exception_is_failed_with_its_class_and_traceback(kind, class_path, last_line):
    result = jobs.raise_base.enqueue(kind)
    finished(result)
    assert result.status == TaskResultStatus.FAILED and len(result.errors) == 1
    assert result.errors[0].exception_class_path == class_path
    assert "in raise_base" in result.errors[0].traceback
    assert result.errors[0].traceback.rstrip().endswith(last_line)
    assert signals_of(result) == {
        ("signal:started", "RUNNING", "AlarmTaskBackend"),
        ("signal:finished", "FAILED", "AlarmTaskBackend"),
    }
    assert jobs.add.enqueue(1, 1) and finished(jobs.add.enqueue(2, 2)) is None  # the worker goes on


@pytest.mark.parametrize(("kind", "class_path", "last_line"), BASE_ENDINGS[:1] + BASE_ENDINGS[2:])
def test_a_deferred_task_that_raises_a_base_exception_is_failed_in_seconds_not_after_its_timeout(
    beat, kind, class_path, last_line
):
    result = jobs.raise_base.using(run_after=timezone.now() + dt.timedelta(seconds=0.5)).enqueue(kind)
    run_beat(beat(), is_finished(result), 15, "the deferred task")  # TIMEOUT_MS is an hour
    assert result.status == TaskResultStatus.FAILED
    assert result.errors[0].exception_class_path == class_path
    assert result.errors[0].traceback.rstrip().endswith(last_line)
    assert ("signal:finished", "FAILED", "AlarmTaskBackend") in signals_of(result)
    wait_for(
        lambda: not Alarm.objects.filter(aggregate_id=result.id, state__in=["pending", "published"]).exists(),
        10,
        "the alarm to end",
    )


def test_a_result_that_json_cannot_hold_fails_the_task_with_an_error_naming_the_field():
    result = jobs.not_a_number.enqueue()
    finished(result)
    assert result.status == TaskResultStatus.FAILED
    assert result.errors[0].exception_class_path == "builtins.ValueError"
    assert "return_value: Out of range float values are not JSON compliant" in result.errors[0].traceback
    assert ("signal:finished", "FAILED", "AlarmTaskBackend") in signals_of(result)


def test_a_nan_argument_is_refused_at_enqueue_and_the_callers_transaction_goes_on():
    with transaction.atomic():
        with pytest.raises(ValueError, match=r"args: Out of range float values .*NaN"):
            jobs.add.enqueue(float("nan"), 1)
        with pytest.raises(ValueError, match=r"kwargs: .*NaN"):
            jobs.add.using(run_after=timezone.now() + dt.timedelta(hours=1)).enqueue(a=1, b=float("inf"))
        assert TaskRecord.objects.count() == 0  # the transaction still answers queries
        assert not Alarm.objects.exists()
        kept = jobs.add.enqueue(1, 2)
    finished(kept)
    assert kept.return_value == 3


def test_arguments_are_normalised_as_djangos_framework_does_before_anything_is_written():
    from collections import UserList

    result = jobs.echo.enqueue(b"x", UserList([1]), (2, 3))
    assert (result.args, TaskRecord.objects.get(pk=result.id).args) == (["x", [1], [2, 3]], ["x", [1], [2, 3]])
    finished(result)
    assert result.status == TaskResultStatus.SUCCESSFUL and result.return_value == ["x", [1], [2, 3]]
    assert signals_of(result) == {
        ("signal:started", "RUNNING", "AlarmTaskBackend"),
        ("signal:finished", "SUCCESSFUL", "AlarmTaskBackend"),
    }
    with pytest.raises(TypeError, match="Unsupported type: <class 'object'>"):
        jobs.echo.enqueue(object())
    with pytest.raises(ValueError, match="Unsupported value"):
        jobs.echo.enqueue(b"\xff")
    assert TaskRecord.objects.count() == 1


def test_a_lost_worker_fails_the_result_in_seconds_with_the_real_exception():
    result = jobs.die.enqueue()
    finished(result, 30)
    assert result.status == TaskResultStatus.FAILED
    assert result.errors[0].exception_class_path == "billiard.exceptions.WorkerLostError"
    assert "WorkerLostError" in result.errors[0].traceback
    assert ("signal:finished", "FAILED", "AlarmTaskBackend") in signals_of(result)


def test_a_deferred_task_on_a_lost_worker_fails_with_the_real_exception(beat):
    result = jobs.die.using(run_after=timezone.now() + dt.timedelta(seconds=0.5)).enqueue()
    run_beat(beat(), is_finished(result), 30, "the deferred task on a lost worker")
    assert result.status == TaskResultStatus.FAILED
    assert [e.exception_class_path for e in result.errors] == ["billiard.exceptions.WorkerLostError"]


def test_a_subclass_of_the_backend_serves_deferred_tasks_and_sends_signals_as_itself(beat):
    from django.test import override_settings

    from celery_scheduller import registry

    with override_settings(TASKS={"only": {"BACKEND": "tests.testapp.backends.ProjectTaskBackend"}}):
        assert registry.serves_django_tasks()
        assert "django_tasks" in registry.names()
    # back to the worker's configuration, which names the subclass "subclassed"
    now = jobs.add_elsewhere.enqueue(2, 3)
    later = jobs.add_elsewhere.using(run_after=timezone.now() + dt.timedelta(seconds=0.5)).enqueue(4, 5)
    scheduler = beat()
    run_beat(scheduler, lambda: is_finished(now)() and is_finished(later)(), 15, "both tasks")
    assert (now.return_value, later.return_value) == (5, 9)
    for result in (now, later):
        assert signals_of(result) == {
            ("signal:started", "RUNNING", "ProjectTaskBackend"),
            ("signal:finished", "SUCCESSFUL", "ProjectTaskBackend"),
        }


def test_a_hard_time_limit_fails_the_result_in_seconds_with_the_real_exception():
    result = jobs.sleep_past_the_time_limit.enqueue()
    finished(result, 30)
    assert result.status == TaskResultStatus.FAILED
    assert result.errors[0].exception_class_path == "billiard.exceptions.TimeLimitExceeded"
    assert "TimeLimitExceeded" in result.errors[0].traceback
    assert ("signal:finished", "FAILED", "AlarmTaskBackend") in signals_of(result)
