"""PostgreSQL LISTEN/NOTIFY: beat learns at once of an alarm dispatched into a window it already loaded.

``dispatch`` notifies (in the caller's transaction, so only committed alarms are announced) when an alarm
is due soon; beat listens on its own connection and wakes at that due time instead of waiting for the
next poll. Everything here is an accelerator: the poll still finds every alarm, on every database.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

logger = logging.getLogger("celery_scheduller")

CHANNEL = "celery_scheduller"


def supported() -> bool:
    """True when the database carries announcements (PostgreSQL)."""
    from . import db

    return db.vendor() == "postgresql"


def announce(scheduller: str, earliest: dt.datetime, latest: dt.datetime) -> None:
    """Tell listening beats that ``scheduller`` has new alarms due from ``earliest`` to ``latest``
    (PostgreSQL only; delivered when the caller's transaction commits)."""
    from django.db import connection

    if not supported():
        return
    payload = f"{earliest.timestamp()!r} {latest.timestamp()!r} {scheduller}"
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, payload])


class Listener:
    """Beat's listening connection (psycopg 3): ``due()`` returns the announced
    ``(scheduller, earliest, latest)`` (epoch seconds)."""

    def __init__(self) -> None:
        self._conn: Any = None
        self.available = True

    def due(self) -> list[tuple[str, float, float]]:
        """The announcements received since the last call; never raises (polling covers any failure)."""
        if not self.available:
            return []
        try:
            if self._conn is None:
                self._connect()
            if self._conn is None:
                return []
            found = []
            for note in self._conn.notifies(timeout=0):
                earliest, latest, name = note.payload.split(" ", 2)
                found.append((name, float(earliest), float(latest)))
            return found
        except Exception:
            logger.warning("LISTEN connection lost; polling until it is back", exc_info=True)
            self.close()
            return []

    def _connect(self) -> None:
        from django.db import connections

        from . import db

        wrapper = connections[db.alias()]
        if wrapper.vendor != "postgresql":
            self.available = False
            return
        try:
            import psycopg
        except ImportError:  # psycopg2: polling only
            self.available = False
            return
        params = wrapper.get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        params.pop("prepare_threshold", None)
        params.pop("server_side_binding", None)
        conn = psycopg.connect(**params, autocommit=True)
        conn.execute(f'LISTEN "{CHANNEL}"')
        self._conn = conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                logger.debug("closing the LISTEN connection failed", exc_info=True)
