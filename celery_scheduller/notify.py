"""PostgreSQL LISTEN/NOTIFY: beat learns at once of an alarm dispatched into a window it already loaded.

``dispatch`` notifies (in the caller's transaction, so only committed alarms are announced) when an alarm
is due soon; beat listens on its own connection and wakes at that due time instead of waiting for the
next poll (``listener``). Everything here is an accelerator: the poll still finds every alarm, on every
database.
"""

from __future__ import annotations

import datetime as dt
import logging

logger = logging.getLogger("celery_scheduller")

CHANNEL = "celery_scheduller"


def supported() -> bool:
    """True when the database carries announcements (PostgreSQL)."""
    from . import db

    return db.vendor() == "postgresql"


def announce(scheduller: str, earliest: dt.datetime, latest: dt.datetime) -> None:
    """Tell listening beats that ``scheduller`` has new alarms due from ``earliest`` to ``latest``
    (PostgreSQL only; delivered when the caller's transaction commits)."""
    from . import db

    if not supported():
        return
    payload = f"{earliest.timestamp()!r} {latest.timestamp()!r} {scheduller}"
    with db.connection().cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, payload])
