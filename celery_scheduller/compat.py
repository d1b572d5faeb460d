"""Every use of Celery, kombu or Django internals, each behind a check of what it relies on.

Nothing outside this module reaches into another library's private attributes. Each helper checks the
attribute it needs and, where it is missing (a release that moved it), logs once and falls back to the
behaviour without the optimisation or the extra safety it gave.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger("celery_scheduller")


@functools.cache
def _warn_once(what: str) -> None:
    logger.warning("celery_scheduller: %s; running without it", what, extra={"action": "compat"})


def ended_requests(requests: Iterable[Any], task_id: str) -> list[Any]:
    """Of the worker's ``requests`` with this task id, those that started and have ended (a hard time limit
    or a lost worker is reported after ``task_ready``): a running, reserved or held request with the same
    id (a forged copy's target) is not among them.

    Relies on ``celery.worker.state.active_requests`` / ``reserved_requests`` and ``Request.time_start``.
    """
    try:
        from celery.worker import state

        active, reserved = state.active_requests, state.reserved_requests
    except (ImportError, AttributeError):
        _warn_once("celery.worker.state has no active_requests/reserved_requests")
        return []
    return [
        request
        for request in requests
        if request.id == task_id
        and getattr(request, "time_start", None) is not None
        and request not in active
        and request not in reserved
    ]


# -- beat: publishing -------------------------------------------------------------------------------------


def library_errors(connection: Any) -> Any:
    """kombu's ``Connection._reraise_as_library_errors()``: broker errors raised as kombu's own, which beat
    treats as a failed publish (release and pause). Without it, the transport's errors pass as they are."""
    reraise = getattr(connection, "_reraise_as_library_errors", None)
    if reraise is None:
        _warn_once("kombu's Connection has no _reraise_as_library_errors: broker errors are not wrapped")
        return contextlib.nullcontext()
    return reraise()


#: The options ``send_task`` takes from a registered task when ``_get_exec_options`` is not there.
_EXEC_OPTIONS = (
    "queue",
    "routing_key",
    "exchange",
    "priority",
    "expires",
    "serializer",
    "delivery_mode",
    "compression",
    "time_limit",
    "soft_time_limit",
    "immediate",
    "mandatory",
    "ignore_result",
)


def task_exec_options(task: Any) -> dict[str, Any]:
    """The registered task's own publish options (queue, priority, time limits…), as ``send_task`` applies
    them: Celery's ``Task._get_exec_options()``, else read from the task's attributes."""
    if task is None:
        return {}
    getter = getattr(task, "_get_exec_options", None)
    if callable(getter):
        return {k: v for k, v in getter().items() if v is not None}
    _warn_once("Celery's Task has no _get_exec_options: the task's options are read from its attributes")
    return {name: getattr(task, name) for name in _EXEC_OPTIONS if getattr(task, name, None) is not None}


# -- the database -----------------------------------------------------------------------------------------


def prepare_cursor(connection: Any, cursor: Any) -> Any:
    """Django's ``_prepare_cursor``: a raw driver cursor wrapped as Django's own (logged, counted, errors
    translated). Without it, the raw cursor (errors then are the driver's)."""
    prepare = getattr(connection, "_prepare_cursor", None)
    if prepare is None:
        _warn_once("Django's connection has no _prepare_cursor: server-bound cursors are not wrapped")
        return cursor
    return prepare(cursor)


def raw_delete(queryset: Any) -> int:
    """``QuerySet._raw_delete``: one DELETE without Django's collector. Without it, ``delete()``."""
    raw = getattr(queryset, "_raw_delete", None)
    if raw is None:
        _warn_once("Django's QuerySet has no _raw_delete: deletes go through the collector")
        deleted, _ = queryset.delete()
        return int(deleted)
    return int(raw(queryset.db))


# -- workers publishing ahead -------------------------------------------------------------------------------


def prefetch_window(parent: Any) -> tuple[Any, Any] | None:
    """The consumer's event loop and prefetch window (``hub``, ``qos``) where ``PromptPrefetch`` can apply a
    raised count early: kombu's ``QoS`` with ``value``, ``prev`` and ``update()``, a hub with ``on_tick`` and
    ``call_later``. None (logged once) where they are not so."""
    hub, qos = getattr(parent, "hub", None), getattr(parent, "qos", None)
    if hub is None or qos is None:
        return None  # no event loop (solo, eventlet, gevent pools): nothing to do, as designed
    if not all(hasattr(qos, name) for name in ("value", "prev", "update")) or not all(
        hasattr(hub, name) for name in ("on_tick", "call_later")
    ):
        _warn_once("kombu's QoS or the worker's hub changed: held eta tasks are taken in at Celery's own pace")
        return None
    return hub, qos


#: The consumer's callbacks the timer calls, with the request first, when a held task comes due: without
#: and with a rate limit.
ETA_CALLBACKS = ("apply_eta_task", "_limit_post_eta")


def eta_callbacks(parent: Any) -> list[str]:
    """Which of ``ETA_CALLBACKS`` the consumer has (logged once when it has none)."""
    found = [name for name in ETA_CALLBACKS if callable(getattr(parent, name, None))]
    if not found:
        _warn_once("Celery's consumer has no apply_eta_task: held tasks keep their timer entries")
    return found


def drop_timer_entry(request: Any) -> None:
    """Celery 5.7 keeps a held task's timer entry on its request (``_eta_timer_entry``); once it has fired,
    drop it, so the request is freed when the task has run (5.5 keeps none: nothing to do)."""
    if getattr(request, "_eta_timer_entry", None) is not None:
        request._eta_timer_entry = None


def seconds_to_eta(request: Any) -> float | None:
    """Seconds until a held task's ``eta`` (Celery's ``Request.eta``, an ISO 8601 string or a datetime, with
    its offset), by this host's clock; None without one, or with one that names no offset."""
    import datetime as dt

    eta = getattr(request, "eta", None)
    if isinstance(eta, str):
        try:
            eta = dt.datetime.fromisoformat(eta)
        except ValueError:
            return None
    if not isinstance(eta, dt.datetime) or eta.tzinfo is None:
        return None
    return (eta - dt.datetime.now(dt.UTC)).total_seconds()


def mark_revoked(request: Any) -> None:
    """Put a held task's id among the worker's revoked ones (``celery.worker.state.revoked``, where Celery's
    ``revoke`` puts it): when it is handed on, the worker acknowledges it, reports it revoked and never runs it.
    Each publish of an alarm has a task id of its own (its attempt), so no later task is caught."""
    from celery.worker import state

    revoked = getattr(state, "revoked", None)
    if revoked is None or not hasattr(revoked, "add"):
        _warn_once("celery.worker.state has no revoked set: a held alarm delivery no longer current runs anyway")
        return
    revoked.add(request.id)


def runs_tasks_in_children(consumer: Any) -> bool:
    """Whether the worker of ``consumer`` runs its tasks in child processes (the prefork pool), not in the
    process that consumes (threads, solo, eventlet, gevent)."""
    pool = getattr(consumer, "pool", None)
    return type(pool).__module__ == "celery.concurrency.prefork"


def process_terminating() -> bool:
    """Whether this (prefork pool) process is being terminated by its parent: billiard's SIGTERM handler ran
    and raised ``SystemExit`` (a hard time limit, a worker shutdown), so a ``SystemExit`` seen now is not the
    task's own. Relies on ``billiard.common.terminate_handler_fired`` (billiard 4.3), else on its
    ``_should_have_exited`` flag; False where neither exists (such a SystemExit is then the task's)."""
    from billiard import common

    fired = getattr(common, "terminate_handler_fired", None)
    if fired is not None:
        return bool(fired())
    flag = getattr(common, "_should_have_exited", None)
    if isinstance(flag, list) and flag:
        return bool(flag[0])
    _warn_once("billiard's terminate-handler flag is missing: a hard time limit may read as SystemExit")
    return False


def check() -> dict[str, bool]:
    """Whether each internal the package relies on is where it expects it, on the installed versions."""
    from celery import Task, current_app
    from celery.worker import state
    from celery.worker.consumer import Consumer
    from celery.worker.request import Request
    from django.db import connection
    from django.db.models import QuerySet
    from kombu import Connection
    from kombu.common import QoS

    return {
        "kombu Connection._reraise_as_library_errors": hasattr(Connection, "_reraise_as_library_errors"),
        "celery Task._get_exec_options": hasattr(Task, "_get_exec_options"),
        "django connection._prepare_cursor": hasattr(connection, "_prepare_cursor"),
        "django QuerySet._raw_delete": hasattr(QuerySet, "_raw_delete"),
        "kombu QoS.prev": "prev" in QoS.__init__.__code__.co_names or hasattr(QoS, "prev"),
        "celery Consumer.apply_eta_task": hasattr(Consumer, "apply_eta_task"),
        "celery worker state.active_requests / reserved_requests": hasattr(state, "active_requests")
        and hasattr(state, "reserved_requests"),
        "celery Request.time_start": "time_start" in getattr(Request, "__slots__", ())
        or hasattr(Request, "time_start"),
        "celery current_app._get_current_object": hasattr(current_app, "_get_current_object"),
        "billiard terminate-handler flag": _billiard_flag(),
    }


def _billiard_flag() -> bool:
    from billiard import common

    return hasattr(common, "terminate_handler_fired") or isinstance(getattr(common, "_should_have_exited", None), list)


def current_celery_app() -> Any:
    """The app behind Celery's ``current_app`` proxy (``_get_current_object``), as the worker holds it."""
    from celery import current_app

    get = getattr(current_app, "_get_current_object", None)
    if get is None:
        _warn_once("Celery's current_app has no _get_current_object: the proxy itself is used")
        return current_app
    return get()
