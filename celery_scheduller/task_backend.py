"""A Django Tasks backend on this engine: ``TASKS = {"default": {"BACKEND":
"celery_scheduller.task_backend.AlarmTaskBackend", "OPTIONS": {…}}}``.

- ``task.enqueue(…)`` publishes at once through Celery (after the caller's transaction commits);
  ``task.using(run_after=…).enqueue(…)`` stores an alarm that beat delivers at that time, inside the
  caller's transaction as ``dispatch`` does.
- Both run in the project's Celery workers as the task ``celery_scheduller.run_django_task`` (found by
  ``app.autodiscover_tasks()``), which records the result: ``get_result`` / ``aget_result`` /
  ``TaskResult.refresh()`` read it until ``RESULT_TTL`` seconds after the task finished.
- ``OPTIONS``: ``RETRY = {"ATTEMPTS": n, "BACKOFF_MS": ms}`` (default: no retry: Django's framework has
  none) runs a failed task again after ``BACKOFF_MS`` × 2^(attempt - 1); ``RESULT_TTL`` (seconds, default one
  day); ``TIMEOUT_MS`` (a deferred task's ``dispatch_timeout``, default an hour).
- ``queue_name`` is the Celery queue (``"default"``: the app's default queue); ``priority`` (-100…100) maps to
  Celery's 0…9 where the broker has priorities (RabbitMQ with ``x-max-priority``, Redis).

Works with Django 6's ``django.tasks`` and, on Django 5.2, the ``django-tasks`` backport (the ``tasks`` extra).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import traceback
from typing import Any

from asgiref.sync import async_to_sync
from django.db import DatabaseError
from django.utils import timezone
from django.utils.crypto import get_random_string
from django.utils.module_loading import import_string

from . import compat, db, states
from .exceptions import ConfigurationError
from .message import Message
from .scheduller import OK, Retry, Scheduller
from .wire import PRIORITY_KEY, QUEUE_KEY

try:  # Django 6
    from django.tasks import TaskContext, TaskResult, TaskResultStatus, task_backends
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import TaskError
    from django.tasks.exceptions import TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started
    from django.utils.json import normalize_json
except ImportError:  # Django 5.2 with the django-tasks backport
    from django_tasks import TaskContext, TaskResult, TaskResultStatus, task_backends  # type: ignore[assignment, no-redef, unused-ignore]
    from django_tasks.backends.base import BaseTaskBackend  # type: ignore[assignment, no-redef, unused-ignore]
    from django_tasks.base import TaskError  # type: ignore[assignment, no-redef, unused-ignore]
    from django_tasks.exceptions import TaskResultDoesNotExist  # type: ignore[assignment, no-redef, unused-ignore]
    from django_tasks.signals import task_enqueued, task_finished, task_started  # type: ignore[assignment, no-redef, unused-ignore]
    from django_tasks.utils import normalize_json  # type: ignore[assignment, no-redef, unused-ignore]

logger = logging.getLogger("celery_scheduller")

#: The Celery task that runs a Django Task in a worker.
RUNNER = "celery_scheduller.run_django_task"
DEFAULT_RESULT_TTL = 86_400
DEFAULT_TIMEOUT_MS = 3_600_000


class AlarmTaskBackend(BaseTaskBackend):
    """Django Tasks on Celery workers; deferred tasks durable as alarms."""

    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        retry = self.options.get("RETRY") or {}
        self.attempts = int(retry.get("ATTEMPTS", 1))
        self.backoff_ms = int(retry.get("BACKOFF_MS", 1_000))
        self.result_ttl = int(self.options.get("RESULT_TTL", DEFAULT_RESULT_TTL))
        self.timeout_ms = int(self.options.get("TIMEOUT_MS", DEFAULT_TIMEOUT_MS))

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        """Record the result as READY and publish now, or store an alarm for ``task.run_after``."""
        from .models import TaskRecord

        self.validate_task(task)
        # as Django's framework does (``TaskResult``), before anything is written: bytes as text, any sequence
        # as a list; its TypeError for a type it refuses, and ours for what JSON cannot hold (NaN, ±Infinity)
        args, kwargs = storable(list(args), "args"), storable(dict(kwargs), "kwargs")
        now = timezone.now()
        record = TaskRecord.objects.create(
            id=get_random_string(32),
            task_path=task.module_path,
            backend=self.alias,
            queue_name=task.queue_name,
            priority=task.priority,
            run_after=task.run_after,
            status=TaskResultStatus.READY,
            args=args,
            kwargs=kwargs,
            enqueued_at=now,
        )
        if task.run_after is None:
            db.on_commit(lambda: self._publish(record.pk, task.queue_name, task.priority))
        else:
            TaskAlarms().dispatch(
                self._message(record.pk, task.queue_name, task.priority), record.pk, at=task.run_after
            )
        result = _result(record, task)
        task_enqueued.send(type(self), task_result=result)
        return result

    def get_result(self, result_id: str) -> Any:
        """The stored result; ``TaskResultDoesNotExist`` when there is none, or it has expired."""
        from .models import TaskRecord

        record = TaskRecord.objects.filter(pk=result_id, backend=self.alias).first()
        if record is None or (record.expires_at is not None and record.expires_at <= timezone.now()):
            raise TaskResultDoesNotExist(result_id)
        return _result(record, _task(record))

    def celery_priority(self, priority: int) -> int | None:
        """Django's -100…100 as Celery's 0…9, in the direction the broker reads it; None for the default."""
        if priority == 0:
            return None
        from celery import current_app

        scaled = round((priority + 100) / 200 * 9)  # 0 lowest … 9 highest
        redis = str(current_app.conf.broker_url or "").startswith(("redis", "rediss"))
        return 9 - scaled if redis else scaled  # kombu's Redis transport runs 0 first

    def celery_queue(self, queue_name: str) -> str | None:
        """The Celery queue of a Django queue name; None (the app's default queue) for ``"default"``."""
        return None if queue_name == "default" else queue_name

    def _message(self, result_id: str, queue_name: str, priority: int) -> Message:
        assigns: dict[str, Any] = {"backend": self.alias}
        if self.celery_queue(queue_name):
            assigns[QUEUE_KEY] = self.celery_queue(queue_name)
        if self.celery_priority(priority) is not None:
            assigns[PRIORITY_KEY] = self.celery_priority(priority)
        return Message.new(RUNNER, {"result_id": result_id}, id=_alarm_id(result_id), assigns=assigns)

    def _publish(self, result_id: str, queue_name: str, priority: int) -> None:
        from celery import current_app

        options: dict[str, Any] = {}
        if self.celery_queue(queue_name):
            options["queue"] = self.celery_queue(queue_name)
        if self.celery_priority(priority) is not None:
            options["priority"] = self.celery_priority(priority)
        current_app.send_task(RUNNER, kwargs={"result_id": result_id}, **options)


class TaskAlarms(Scheduller):
    """The alarms of deferred Django Tasks (and their retries); served whenever ``TASKS`` names
    ``AlarmTaskBackend``, without an entry in ``CELERY_SCHEDULLER_CLASSES``."""

    name = "django_tasks"

    def service_responded(self, message: Message) -> Any:
        response = message.response
        assert response is not None
        if response.ok and isinstance(response.value, dict) and response.value.get("retry_in_ms") is not None:
            return Retry(int(response.value["retry_in_ms"]), message)
        if not response.ok:  # the runner did not run to its end: a time limit, a lost worker, a timeout
            retry_in = record_outcome(
                str(message.raw_request.get("result_id")), None, f"{response.status}: {response.error or ''}"
            )
            if retry_in is not None:
                return Retry(retry_in, message)
        return OK

    def dispatch_timeout(self, message: Message) -> int:
        return _backend(message.assigns.get("backend", "default")).timeout_ms


def run(result_id: str, worker_id: str | None = None) -> dict[str, Any]:
    """Run the Django Task of ``result_id`` in this worker and record its outcome (``run_django_task``).

    Never raises for the task's own error: the outcome is the result's; returns ``{"retry_in_ms": …}``
    (None when no retry follows) for the alarm's ``service_responded``.
    """
    from .hooks import current_message
    from .models import TaskRecord

    record = TaskRecord.objects.filter(pk=result_id).first()
    if record is None:
        logger.error("Django Task result %s not found: nothing to run", result_id, extra={"action": "ignored"})
        return {"retry_in_ms": None}
    task = _task(record)
    now = timezone.now()
    record.status = TaskResultStatus.RUNNING
    record.started_at = record.started_at or now
    record.last_attempted_at = now
    record.worker_ids = [*record.worker_ids, worker_id or socket.gethostname()]
    record.save(update_fields=["status", "started_at", "last_attempted_at", "worker_ids"])
    result = _result(record, task)
    task_started.send(type(_backend(record.backend)), task_result=result)
    try:
        call_args = [TaskContext(task_result=result), *record.args] if task.takes_context else list(record.args)
        value = task.func(*call_args, **record.kwargs)
        if hasattr(value, "__await__"):
            value = async_to_sync(_awaited)(value)
    except BaseException as exc:  # SystemExit, KeyboardInterrupt too: the task's outcome, not the worker's
        if isinstance(exc, SystemExit) and compat.process_terminating():
            # not the task's own: its process is being terminated (a hard time limit, a shutdown); the worker's
            # main process records the real cause (``on_runner_failure``)
            raise
        if not isinstance(exc, Exception):
            logger.error(
                "Django Task %s (result %s) raised %s: recorded as its failure; the worker goes on",
                record.task_path,
                result_id,
                type(exc).__name__,
                extra={"action": "task_failed"},
            )
        retry_in = _record_outcome(record, None, "", exc)
    else:
        retry_in = _record_outcome(record, value, None)
    if retry_in is not None and current_message() is None:
        _retry_as_alarm(record, retry_in)  # published at once, not an alarm: the retry is one
        return {"retry_in_ms": None}
    return {"retry_in_ms": retry_in}


def _retry_as_alarm(record: Any, retry_in: int) -> None:
    """The next attempt of a task that was published at once: an alarm of ``TaskAlarms`` ``retry_in`` ms on."""
    message = _backend(record.backend)._message(record.pk, record.queue_name, record.priority)
    TaskAlarms().dispatch(message, record.pk, in_ms=retry_in)


def _alarm_id(result_id: str) -> str:
    """The message id of the alarm that runs (or retries) the Django Task of ``result_id``."""
    return f"django-task-{result_id}"


def _class_path(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


async def _awaited(value: Any) -> Any:
    return await value


def record_outcome(
    result_id: str, value: Any, failure: str | None, exc: BaseException | None = None, traceback_text: str = ""
) -> int | None:
    """Store what the running attempt of ``result_id`` came to, unless its runner already did (a result not
    ``RUNNING``); returns the ms until the next attempt, or None."""
    from .models import TaskRecord

    record = TaskRecord.objects.filter(pk=result_id).first()
    if record is None:
        return None
    if record.status != TaskResultStatus.RUNNING:  # recorded: the retry it decided, if any
        return _retry_delay(_backend(record.backend), record) if record.status == TaskResultStatus.READY else None
    return _record_outcome(record, value, failure, exc, traceback_text)


def storable(value: Any, field: str) -> Any:
    """``value`` as Django's framework normalises it (``normalize_json``: its TypeError for a type it refuses),
    checked to be JSON a database keeps: NaN and ±Infinity are refused with a ValueError naming ``field``."""
    normalized = normalize_json(value)
    try:
        json.dumps(normalized, allow_nan=False)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}: NaN and ±Infinity cannot be stored as JSON") from None
    return normalized


def _retry_delay(backend: AlarmTaskBackend, record: Any) -> int:
    attempts = max(len(record.worker_ids), 1)
    return int(backend.backoff_ms * 2 ** (attempts - 1))


def _record_outcome(
    record: Any, value: Any, failure: str | None, exc: BaseException | None = None, traceback_text: str = ""
) -> int | None:
    """``record_outcome`` of a result already read (``run`` holds it)."""
    backend = _backend(record.backend)
    now = timezone.now()
    if failure is None and exc is None:
        try:
            record.return_value = storable(value, "return_value")
        except (TypeError, ValueError) as bad:
            exc = bad
        else:
            record.status = TaskResultStatus.SUCCESSFUL
    retry_in: int | None = None
    if exc is not None or failure:
        record.return_value = None
        if exc is not None:
            path = _class_path(exc)
            text = traceback_text or "".join(traceback.format_exception(exc))
        else:
            path, text = "celery_scheduller.exceptions.SchedullerError", str(failure)
        record.errors = [*record.errors, {"exception_class_path": path, "traceback": text}]
        if max(len(record.worker_ids), 1) < backend.attempts:
            retry_in = _retry_delay(backend, record)
            record.status = TaskResultStatus.READY
        else:
            record.status = TaskResultStatus.FAILED
    if retry_in is None:
        record.finished_at = now
        record.expires_at = now + dt.timedelta(seconds=backend.result_ttl)
    _save(record)
    if retry_in is None:
        task_finished.send(type(backend), task_result=_result(record, _task(record)))
    return retry_in


def _save(record: Any) -> None:
    """Save the outcome; one the database refuses is replaced by that error, so the result still ends."""
    try:
        with db.atomic():
            record.save()
    except DatabaseError as exc:
        logger.error(
            "the outcome of Django Task result %s could not be stored (%s): recorded as its failure",
            record.pk,
            exc,
            extra={"action": "task_failed"},
        )
        path = _class_path(exc)
        text = f"storing the task's outcome failed: {''.join(traceback.format_exception(exc))}"
        record.return_value = None
        record.errors = [*record.errors, {"exception_class_path": path, "traceback": text}]
        record.status = TaskResultStatus.FAILED
        record.finished_at = record.finished_at or timezone.now()
        record.expires_at = record.expires_at or record.finished_at + dt.timedelta(
            seconds=_backend(record.backend).result_ttl
        )
        record.save()


def on_runner_failure(
    sender: Any = None,
    exception: BaseException | None = None,
    kwargs: Any = None,
    einfo: Any = None,
    **_: Any,
) -> None:
    """Celery's ``task_failure`` for the runner: a lost worker (a killed process, an ``exit()`` under the
    threads pool) or a hard time limit ends its attempt, which the runner itself never recorded, with the
    real exception; the runner's own failures land here too if recording failed. A retry of a task published
    at once is then an alarm, as ``run`` makes it."""
    if getattr(sender, "name", None) != RUNNER or exception is None:
        return
    result_id = str((kwargs or {}).get("result_id", ""))
    try:
        text = str(getattr(einfo, "traceback", "") or "") or "".join(traceback.format_exception(exception))
        retry_in = record_outcome(result_id, None, None, exception, text)
        if retry_in is not None:
            from .models import Alarm, TaskRecord

            if not Alarm.objects.filter(message_id=_alarm_id(result_id), state__in=states.ACTIVE).exists():
                _retry_as_alarm(TaskRecord.objects.get(pk=result_id), retry_in)  # else its alarm retries it
    except Exception:
        logger.exception("recording the failure of Django Task result %s failed", result_id)


def connect() -> None:
    """Connect ``on_runner_failure``: before the alarm hooks, so a deferred task's real exception is recorded
    before its alarm's ``service_responded`` sees the attempt's error."""
    from celery import signals

    signals.task_failure.connect(on_runner_failure, weak=False, dispatch_uid="celery_scheduller.task_runner_failure")


def _backend(alias: str) -> AlarmTaskBackend:
    backend = task_backends[alias]
    if not isinstance(backend, AlarmTaskBackend):
        raise ConfigurationError(f"TASKS[{alias!r}] is not AlarmTaskBackend")
    return backend


def _task(record: Any) -> Any:
    task = import_string(record.task_path)
    changes: dict[str, Any] = {"queue_name": record.queue_name, "priority": record.priority}
    if record.run_after is not None:
        changes["run_after"] = record.run_after
    return task.using(**changes)


def _result(record: Any, task: Any) -> Any:
    result: Any = TaskResult(
        task=task,
        id=record.pk,
        status=TaskResultStatus(record.status),
        enqueued_at=record.enqueued_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        last_attempted_at=record.last_attempted_at,
        args=list(record.args),
        kwargs=dict(record.kwargs),
        backend=record.backend,
        errors=[TaskError(**error) for error in record.errors],
        worker_ids=list(record.worker_ids),
    )
    if record.status == TaskResultStatus.SUCCESSFUL:
        object.__setattr__(result, "_return_value", record.return_value)
    return result
