"""Beat's LISTEN connection: the announcements ``notify.announce`` sends when an alarm is dispatched into a
window beat already loaded (PostgreSQL with psycopg 3; elsewhere beat polls)."""

from __future__ import annotations

import logging
from typing import Any

from .notify import CHANNEL

logger = logging.getLogger("celery_scheduller")


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

    @property
    def waitable(self) -> bool:
        """Whether ``wait`` can sleep until an announcement arrives (connected)."""
        return self.available and self._conn is not None

    def wait(self, timeout: float) -> bool:
        """Sleep until an announcement arrives or ``timeout`` seconds pass; True when one arrived (read it
        with ``due``). Without a connection, a plain sleep."""
        import select
        import time

        conn = self._conn
        if conn is None:
            time.sleep(timeout)
            return False
        try:
            readable, _, _ = select.select([conn.fileno()], [], [], timeout)
        except (OSError, ValueError):  # closed meanwhile: ``due`` reconnects
            return True
        return bool(readable)

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
