"""The worker side: tells a task which Message it delivers and turns its outcome into a response.

Connected to Celery's task signals by the app's ``ready()``:

- ``task_prerun``: an alarm delivery (recognised by its header) gets its Message as ``current_message()``;
- ``task_postrun``: the return value or exception becomes ``message.response`` → ``service_responded``,
  whose decision the process's response writer stores (``writer``);
- ``task_failure`` in the worker's main process: a hard time limit or a lost worker, for which the pool
  child never reached ``task_postrun``, becomes an ``error`` response;
- ``worker_init``: with ``PUBLISH_AHEAD`` set, the worker's consumer gets ``prefetch.PromptPrefetch``.

A failing hook is logged with the alarm id and never raised into the worker.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
from typing import Any

from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import signals, states

from . import prefetch
from .message import Message, Response, compact_json
from .store import AttemptRef

logger = logging.getLogger("celery_scheduller")

#: The task header carrying the alarm's attempt and Message (one JSON string).
HEADER = "celery_scheduller"

_delivery: contextvars.ContextVar[tuple[AttemptRef, Message] | None] = contextvars.ContextVar(
    "celery_scheduller_delivery", default=None
)


def current_message() -> Message | None:
    """The Message the running task delivers, or None outside an alarm delivery."""
    found = _delivery.get()
    return None if found is None else found[1]


def task_id_of(message_id: str, attempt: int) -> str:
    """The Celery task id of one attempt: the same message id and attempt on every redelivery."""
    return f"{message_id}#{attempt}"


def header_of(ref: AttemptRef, message: Message) -> dict[str, str]:
    """The headers that mark a task as the delivery of ``ref``."""
    return {HEADER: compact_json({"ref": ref.to_json(), "message": message.to_json()})}


def _read_header(request: Any) -> tuple[AttemptRef, Message] | None:
    raw: str | None = (getattr(request, "headers", None) or {}).get(HEADER) or getattr(request, HEADER, None)
    if not raw:
        return None
    data = json.loads(raw)
    return AttemptRef.from_json(data["ref"]), Message.from_json(data["message"])


def _on_prerun(task_id: str, task: Any, **_: Any) -> None:
    try:
        found = _read_header(task.request)
    except Exception:
        logger.exception("unreadable %s header on task %s", HEADER, task_id, extra={"action": "hook_error"})
        found = None
    _delivery.set(found)


def _on_postrun(task_id: str, task: Any, retval: Any = None, state: str | None = None, **_: Any) -> None:
    found = _delivery.get()
    _delivery.set(None)
    if found is None:
        return
    if state == states.SUCCESS:
        response = Response("ok", value=retval)
    elif state == states.FAILURE:
        response = Response("error", error=describe(retval))
    else:
        return  # RETRY, IGNORED, REJECTED: the task has not finished; a later run or the timeout answers
    _answer(*found, response, deferred=not getattr(task.request, "is_eager", False) and _writer_serves())


def _on_failure(task_id: str, exception: BaseException | None = None, **_: Any) -> None:
    if not isinstance(exception, (TimeLimitExceeded, WorkerLostError)) or "#" not in (task_id or ""):
        return  # ordinary failures were answered by task_postrun in the pool child
    from . import store

    message_id, _sep, attempt = task_id.rpartition("#")
    try:
        found = store.published_attempt(message_id, int(attempt))
    except Exception:
        logger.exception("cannot look up alarm %s", message_id, extra={"alarm_id": message_id, "action": "hook_error"})
        return
    if found is not None:
        _answer(*found, Response("error", error=describe(exception)))


@functools.cache
def _writer_serves() -> bool:
    """Whether responses go through the process's response writer: on every database but SQLite, whose
    single writer lock a second connection per process would only contend for."""
    from django.db import connections

    return connections["default"].vendor != "sqlite"


def _answer(ref: AttemptRef, message: Message, response: Response, deferred: bool = False) -> None:
    """Decide what ``response`` means for the alarm (``service_responded``) and store it: now, or with
    ``deferred`` through the process's response writer (``writer``)."""
    from . import clock, responses, writer

    now = clock.default.now_datetime()
    if now > ref.deadline:
        logger.info(
            "response for alarm %s attempt %s ignored: it came after the deadline",
            message.id,
            ref.attempt,
            extra={"alarm_id": message.id, "attempt": ref.attempt, "action": "ignored"},
        )
        return
    try:
        if deferred:
            writer.default.submit(responses.decide(ref, message, response, now))
        else:
            responses.respond(ref, message, response, now)
    except Exception:
        # The attempt stays published; its deadline passes and beat answers it as a timeout.
        logger.exception(
            "storing the response for alarm %s failed",
            message.id,
            extra={"alarm_id": message.id, "action": "hook_error"},
        )


def describe(error: object) -> str:
    """A one-line name of an exception: its type and message."""
    if isinstance(error, BaseException):
        text = str(error)
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return repr(error)


def _stop_writer(**_: Any) -> None:
    """A worker process that exits stores the responses its writer still holds first."""
    from . import writer

    if not writer.default.stop():
        logger.error("the response writer did not store every response before the process exited")


def connect() -> None:
    """Connect the hooks to Celery's signals (idempotent)."""
    signals.worker_init.connect(prefetch.install, weak=False, dispatch_uid="celery_scheduller.prompt_prefetch")
    signals.worker_process_shutdown.connect(
        _stop_writer, weak=False, dispatch_uid="celery_scheduller.stop_writer_child"
    )
    signals.worker_shutdown.connect(_stop_writer, weak=False, dispatch_uid="celery_scheduller.stop_writer")
    signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="celery_scheduller.prerun")
    signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="celery_scheduller.postrun")
    signals.task_failure.connect(_on_failure, weak=False, dispatch_uid="celery_scheduller.failure")
