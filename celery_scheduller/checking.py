"""The checks of what ``dispatch``, ``reschedule`` and a ``Retry`` are given, made where they are given:
storable values within the size limits, a due time the database stores, a task the Celery app knows."""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

from .exceptions import InvalidAlarm
from .message import Message, storable_json
from .wire import configured_header_limit, header_size


def encode_for_storage(
    message: Message, limit: int, what: str = "message", header_limit: int | None = None
) -> tuple[str, str]:
    """``message``'s raw_request and assigns as the JSON stored for them; ``InvalidAlarm`` naming the field
    for anything that cannot be stored (``message.storable_json``), a message larger than ``limit``
    (``MAX_PAYLOAD``) bytes, or assigns and ids larger than ``header_limit`` (what the broker carries in
    a delivery's header: RabbitMQ's frame_max). The one check of what an alarm stores: dispatch and Retry."""
    raw_json = storable_json(message.raw_request, f"{what} {message.id!r}: raw_request")
    assigns_json = storable_json(message.assigns, f"{what} {message.id!r}: assigns")
    size = (
        len(raw_json)
        + len(assigns_json)
        + len(message.service_name)
        + len(message.id)
        + len(message.correlation_id)
        + len(message.causation_id)
    )
    if size > limit:
        raise InvalidAlarm(
            f"{what} {message.id!r} is {size} bytes as JSON, more than CELERY_SCHEDULLER_MAX_PAYLOAD ({limit})"
        )
    if header_limit is not None and header_size(message, assigns_json) > header_limit:
        raise InvalidAlarm(
            f"{what} {message.id!r}: its assigns and ids are {header_size(message, assigns_json)} bytes as JSON, "
            f"more than the broker carries in a message header ({header_limit}, within RabbitMQ's frame_max); "
            "keep large data in raw_request"
        )
    return raw_json, assigns_json


def broker_header_limit() -> int | None:
    """``wire.configured_header_limit`` of the current Celery app."""
    from celery import current_app

    return configured_header_limit(current_app.conf)


#: The due times an alarm may have: what every supported database stores (MariaDB's DATETIME starts at
#: year 1000), with room below year 9999 for a deadline and beat's load windows after it.
EARLIEST_DUE: Final = dt.datetime(1000, 1, 1, tzinfo=dt.UTC)
LATEST_DUE: Final = dt.datetime(9998, 12, 31, tzinfo=dt.UTC)


def due_time(at: dt.datetime | None, in_ms: int | None, now: dt.datetime) -> dt.datetime:
    """When an alarm given ``at`` or ``in_ms`` is due; exactly one of them must be given."""
    if (at is None) == (in_ms is None):
        raise InvalidAlarm("give exactly one of at= (an aware datetime) or in_ms= (milliseconds from now)")
    if at is not None:
        if not isinstance(at, dt.datetime):
            raise InvalidAlarm(f"at must be a datetime, got {type(at).__name__}")
        if at.tzinfo is None or at.utcoffset() is None:
            raise InvalidAlarm(f"at={at!r} is naive; pass a timezone-aware datetime (e.g. django.utils.timezone.now())")
        try:
            return _in_range(at.astimezone(dt.UTC), f"at={at!r}")
        except OverflowError:
            raise InvalidAlarm(f"at={at!r} is outside the years 1 to 9999 in UTC") from None
    if isinstance(in_ms, bool) or not isinstance(in_ms, int):
        raise InvalidAlarm(f"in_ms must be an integer of milliseconds, got {in_ms!r}")
    if in_ms < 0:
        raise InvalidAlarm(f"in_ms must not be negative, got {in_ms}")
    try:
        due = now + dt.timedelta(milliseconds=in_ms)
    except OverflowError:
        raise InvalidAlarm(f"in_ms={in_ms} is after the last time a datetime holds (year 9999)") from None
    return _in_range(due, f"in_ms={in_ms}")


def _in_range(due: dt.datetime, given: str) -> dt.datetime:
    if not EARLIEST_DUE <= due <= LATEST_DUE:
        raise InvalidAlarm(
            f"{given} is due at {due.isoformat()}, outside the times the database stores "
            f"({EARLIEST_DUE.date()} to {LATEST_DUE.date()} UTC)"
        )
    return due


_tasks_imported: set[int] = set()


def known_tasks(app: Any = None) -> set[str] | None:
    """The task names ``app`` (default: the current app) has registered, or None if it has none of its own.

    The first call for an app imports its task modules the way ``celery worker`` does on start
    (``autodiscover_tasks`` included), so a web process knows the same names as the workers.
    """
    if app is None:
        from . import compat

        app = compat.current_celery_app()
    if id(app) not in _tasks_imported:
        _tasks_imported.add(id(app))
        app.loader.import_default_modules()
    names = set(app.tasks)
    return names if any(not name.startswith("celery.") for name in names) else None


def _check_task(name: str) -> None:
    """Refuse a task name the Celery app does not know, when the app has registered its tasks."""
    from celery import current_app

    if name in current_app.tasks:  # the common case, without building the set of names
        return
    names = known_tasks()
    if names is not None and name not in names:
        raise InvalidAlarm(f"no Celery task named {name!r} is registered with the Celery app")
