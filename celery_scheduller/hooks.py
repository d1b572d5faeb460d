"""The worker side: tells a task which Message it delivers and turns its outcome into a response.

Connected to Celery's task signals by the app's ``ready()``:

- ``task_prerun``: an alarm delivery (recognised by its header) gets its Message as ``current_message()``;
- ``task_postrun``: the return value or exception becomes ``message.response`` → ``service_responded``,
  whose decision the process's response writer stores (``writer``);
- ``task_failure`` in the worker's main process: a hard time limit or a lost worker, for which the pool
  child never reached ``task_postrun``, becomes an ``error`` response (the delivery found by its header,
  kept from ``task_received``, never by its task id);
- ``task_unknown``: a delivery of a task the worker does not know becomes an ``error`` response;
- ``worker_init``: the worker's consumer gets ``prefetch.GuardHeldAlarms`` (a held alarm delivery runs only
  if still current when due), and with ``PUBLISH_AHEAD`` set ``prefetch.PromptPrefetch``;
- ``task_received`` in the main process: a held alarm delivery is looked up ahead of its time (``prefetch``);
- ``worker_ready`` and ``worker_process_init``: the guard's looker and the response writer are started and
  connected before the first delivery; with WORKER_GC_FREEZE, what the started process holds is frozen out of
  the garbage collector's full passes (``gc.freeze``), which then pause it for less.

A failing hook is logged with the alarm id and never raised into the worker.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import time
import weakref
from typing import Any

from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import signals, states

from . import activity, compat, metrics, observe, prefetch, tracing, writer
from .message import Message, Response, describe
from .wire import HEADER, AttemptRef, BadHeader, read_header

logger = logging.getLogger("celery_scheduller")

_delivery: contextvars.ContextVar[tuple[AttemptRef, Message] | None] = contextvars.ContextVar(
    "celery_scheduller_delivery", default=None
)
#: The running delivery's start (``time.perf_counter``) and its span
_running: contextvars.ContextVar[tuple[float, Any] | None] = contextvars.ContextVar(
    "celery_scheduller_running", default=None
)

#: The worker's main process: the requests of alarm deliveries it received, while they live. A hard time
#: limit or a lost worker is reported there with the task id only; the request (and its header) is found
#: here among those that ended, so a forged message reusing a delivery's task id answers nothing.
_received: weakref.WeakSet[Any] = weakref.WeakSet()


def current_message() -> Message | None:
    """The Message the running task delivers, or None outside an alarm delivery."""
    found = _delivery.get()
    return None if found is None else found[1]


def _delivery_of(headers: Any, kwargs: Any, task_id: str) -> tuple[AttemptRef, Message] | None:
    """The delivery a task's headers name, or None (no header, or one this project did not sign: logged)."""
    try:
        return read_header(headers, kwargs)
    except (BadHeader, ValueError, KeyError, TypeError) as exc:
        logger.error(
            "task %s carries a %s header that is not this project's (%s): not treated as an alarm delivery",
            task_id,
            HEADER,
            exc,
            extra={"action": "bad_header"},
        )
        return None


def _on_prerun(task_id: str, task: Any, **_: Any) -> None:
    request = task.request
    # protocol 2 makes the message's headers attributes of the request; ``headers`` holds them elsewhere
    raw = getattr(request, HEADER, None) or (getattr(request, "headers", None) or {}).get(HEADER)
    found = _delivery_of({HEADER: raw}, getattr(request, "kwargs", None), task_id) if raw else None
    _delivery.set(found)
    _running.set(None if found is None else _started(*found, request))


def _started(ref: AttemptRef, message: Message, request: Any) -> tuple[float, Any]:
    """The task of an alarm delivery starts: its lateness is counted, its span opened (``tracing``)."""
    from . import clock

    due = message.assigns.get("dispatch_at")
    if isinstance(due, dt.datetime):
        observe.started(ref.scheduller, message.service_name, clock.default.now() - due.timestamp())
    try:
        span = tracing.start_run(ref.scheduller, ref.attempt, message, request)
    except Exception:
        logger.warning("opening the task's span failed", exc_info=True, extra={"alarm_id": message.id})
        span = None
    return time.perf_counter(), span


def _on_postrun(task_id: str, task: Any, retval: Any = None, state: str | None = None, **_: Any) -> None:
    found, running = _delivery.get(), _running.get()
    _delivery.set(None)
    _running.set(None)
    if found is None:
        return
    try:
        _finish(found, running, task, retval, state)
    finally:
        if running is not None:
            error = retval if state == states.FAILURE and isinstance(retval, BaseException) else None
            tracing.end_run(running[1], error)


def _finish(found: tuple[AttemptRef, Message], running: Any, task: Any, retval: Any, state: str | None) -> None:
    if running is not None:
        observe.ran(found[0].scheduller, found[1].service_name, time.perf_counter() - running[0])
    if state == states.SUCCESS:
        response = Response("ok", value=retval)
    elif state == states.FAILURE:
        response = Response("error", error=describe(retval))
    else:
        return  # RETRY, IGNORED, REJECTED: the task has not finished; a later run or the timeout answers
    _answer(*found, response, deferred=not getattr(task.request, "is_eager", False) and writer.serves())


def _on_received(request: Any = None, **_: Any) -> None:
    """Main process: keep the request of an alarm delivery reachable by its task id while it lives."""
    headers = getattr(request, "request_dict", None) or {}
    if headers.get(HEADER):
        _received.add(request)


def _on_failure(task_id: str, exception: BaseException | None = None, **_: Any) -> None:
    """Main process: a hard time limit or a lost worker, which the pool child never answered."""
    if not isinstance(exception, (TimeLimitExceeded, WorkerLostError)):
        return  # ordinary failures were answered by task_postrun in the pool child
    for request in compat.ended_requests(list(_received), task_id):
        _received.discard(request)
        found = _delivery_of(request.request_dict, request.kwargs, task_id)
        if found is not None:
            _answer_if_current(*found, Response("error", error=describe(exception)))


def _on_unknown(message: Any = None, name: str = "", id: str = "", **_: Any) -> None:  # noqa: A002
    """Main process: a task this worker does not know (a deploy not yet rolled out, a typo in a retry):
    for an alarm delivery, the application decides, as for an unavailable service."""
    headers = getattr(message, "headers", None)
    kwargs: Any = None
    try:
        body = message.decode() if message is not None else None
        if isinstance(body, (list, tuple)) and len(body) >= 2:
            kwargs = body[1]
    except Exception:
        kwargs = None
    found = _delivery_of(headers, kwargs, id)
    if found is not None:
        _answer_if_current(*found, Response("error", error=f"NotRegistered: no task named {name!r} on this worker"))


def _answer_if_current(ref: AttemptRef, message: Message, response: Response) -> None:
    """``_answer`` for the main process's paths, after checking the attempt is still the alarm's current one."""
    from . import store

    try:
        current = store.is_current(ref)
    except Exception:
        logger.exception(
            "cannot look up alarm %s", ref.message_id, extra={"alarm_id": ref.message_id, "action": "hook_error"}
        )
        return
    if current:
        _answer(ref, message, response)
    else:
        logger.info(
            "no current attempt %s of alarm %s: %s not answered",
            ref.attempt,
            ref.message_id,
            response.status,
            extra={"alarm_id": ref.message_id, "attempt": ref.attempt, "action": "ignored"},
        )


def _answer(ref: AttemptRef, message: Message, response: Response, deferred: bool = False) -> None:
    """Decide what ``response`` means for the alarm (``service_responded``) and store it: now, or with
    ``deferred`` through the process's response writer (``writer``)."""
    from . import clock, responses

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


def _stop_writer(**_: Any) -> None:
    """A worker process that exits stores the responses its writer still holds first, then its activity."""
    if not writer.default.stop():
        logger.error("the response writer did not store every response before the process exited")
    activity.default.flush_at_exit()


def _pool_process_exited(pid: int = 0, **_: Any) -> None:
    """A prefork pool process is exiting: its live figures are dropped (multiprocess metrics)."""
    metrics.process_exited(pid)


def _serve_metrics(**_: Any) -> None:
    """Main process: serve the worker's metrics where WORKER_METRICS_PORT is set."""
    from .conf import settings

    port = settings.port("WORKER_METRICS_PORT")
    if port is not None:
        metrics.serve(port, "worker")


def _warm_up(sender: Any = None, **_: Any) -> None:
    """``worker_ready`` (main process) and ``worker_process_init`` (a prefork child): what the first alarm
    delivery would otherwise wait for is done now: the modules it reads imported (tens of ms, the import lock
    held, where the first alarms of a run would wait for them), the keys its header is checked with derived,
    the metrics made, the guard's looker (with a first look, which loads the alarm table's plan in its database
    session) and (where tasks run in this process) the response writer started and connected."""
    from . import clock, registry, responses, store, wire  # noqa: F401  (imported now, not by the first alarm)

    try:
        wire._keys()
        registry.names()
        metrics.get()
        if sender is not None and prefetch._guard and prefetch._guard[0].looker is not None:
            prefetch._guard[0].looker.start()  # the main process, whatever its pool
        if writer.serves() and (sender is None or not compat.runs_tasks_in_children(sender)):
            writer.default.warm()
    except Exception:
        logger.warning("warming up for alarm deliveries failed; the first one does it", exc_info=True)
    clock.default.apart = True  # the database's clock is read again on a thread of its own, not a task's
    try:
        clock.default.now()  # read now, not by the first alarm
    except Exception as exc:
        logger.warning("cannot read the database's clock yet (%s); the first alarm does", exc)
    _freeze_gc()


def _freeze_gc(**_: Any) -> None:
    """``worker_ready`` (the main process) and ``worker_process_init`` (a prefork child): with
    WORKER_GC_FREEZE, collect once and freeze what the started process holds (``gc.freeze``)."""
    import gc

    from .conf import settings

    if settings.get("WORKER_GC_FREEZE"):
        gc.collect()
        gc.freeze()


def _check_at_start(**_: Any) -> None:
    """A worker with a configuration error stops before it consumes, with the check's message."""
    from .checks import stop_on_errors

    stop_on_errors("worker")


def connect() -> None:
    """Connect the hooks to Celery's signals (idempotent)."""
    signals.worker_init.connect(_check_at_start, weak=False, dispatch_uid="celery_scheduller.check_at_start")
    signals.worker_init.connect(prefetch.install, weak=False, dispatch_uid="celery_scheduller.prompt_prefetch")
    signals.worker_init.connect(_serve_metrics, weak=False, dispatch_uid="celery_scheduller.metrics")
    signals.worker_ready.connect(_warm_up, weak=False, dispatch_uid="celery_scheduller.warm_up")
    signals.worker_process_init.connect(_warm_up, weak=False, dispatch_uid="celery_scheduller.warm_up_child")
    signals.worker_process_shutdown.connect(
        _pool_process_exited, weak=False, dispatch_uid="celery_scheduller.metrics_process_exited"
    )
    signals.worker_process_shutdown.connect(
        _stop_writer, weak=False, dispatch_uid="celery_scheduller.stop_writer_child"
    )
    signals.worker_shutdown.connect(_stop_writer, weak=False, dispatch_uid="celery_scheduller.stop_writer")
    signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="celery_scheduller.prerun")
    signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="celery_scheduller.postrun")
    signals.task_failure.connect(_on_failure, weak=False, dispatch_uid="celery_scheduller.failure")
    signals.task_received.connect(_on_received, weak=False, dispatch_uid="celery_scheduller.received")
    signals.task_received.connect(prefetch.received, weak=False, dispatch_uid="celery_scheduller.guard_received")
    signals.task_unknown.connect(_on_unknown, weak=False, dispatch_uid="celery_scheduller.unknown")
