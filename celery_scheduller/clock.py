"""One clock: this host's clock corrected to the database server's, the reference for due times,
claims and deadlines, so hosts whose clocks disagree still agree on when an alarm is due."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable


def to_datetime(moment: float) -> dt.datetime:
    """An epoch timestamp as an aware UTC datetime."""
    return dt.datetime.fromtimestamp(moment, dt.UTC)


#: Seconds between measurements of the offset to the database clock.
RESYNC_SECONDS = 60.0


class DatabaseClock:
    """``now()`` = the local clock plus the offset to the database clock, measured every ``resync`` s.

    SQLite runs in this process on this host: its offset is zero by definition.
    """

    def __init__(self, local: Callable[[], float] = time.time, resync: float = RESYNC_SECONDS) -> None:
        self.local = local
        self.resync = resync
        self.offset = 0.0
        self._next_sync = float("-inf")
        #: a later measurement runs on a thread of its own, with the offset as it was meanwhile, not in the
        #: caller's (a worker's: its task threads would open a connection for it in a task's path)
        self.apart = False
        self._apart: threading.Thread | None = None  # the measurement under way apart, if any

    def now(self) -> float:
        """Database time as epoch seconds."""
        reading = self.local()
        if reading >= self._next_sync or reading < self._next_sync - 2 * self.resync:
            if self.apart and self._next_sync > float("-inf"):  # measured once already
                self._next_sync = reading + self.resync
                if self._apart is None or not self._apart.is_alive():  # one at a time, however slow the database
                    self._apart = threading.Thread(target=self._sync_apart, name="celery_scheduller-clock", daemon=True)
                    self._apart.start()
            else:
                self._sync()
                self._next_sync = reading + self.resync
        return reading + self.offset

    def now_datetime(self) -> dt.datetime:
        """Database time as an aware UTC datetime."""
        return dt.datetime.fromtimestamp(self.now(), dt.UTC)

    def _sync(self) -> None:
        from . import db

        connection = db.connection()
        if connection.vendor == "sqlite":
            self.offset = 0.0
            return
        # Connect first: the server reads its clock when the statement runs, so a connection set up
        # between the two local readings would put the midpoint early and this clock ahead by half of it.
        connection.ensure_connection()
        with connection.cursor() as cursor:
            before = self.local()
            # the time the statement runs, not its transaction's start (CURRENT_TIMESTAMP, NOW()), which
            # inside a transaction is as old as the transaction; MariaDB's has microseconds when asked, in UTC
            cursor.execute("SELECT UTC_TIMESTAMP(6)" if connection.vendor == "mysql" else "SELECT clock_timestamp()")
            (server,) = cursor.fetchone()
            after = self.local()
        if server.tzinfo is None:  # UTC_TIMESTAMP is naive
            server = server.replace(tzinfo=dt.UTC)
        self.offset = server.timestamp() - (before + after) / 2

    def _sync_apart(self) -> None:
        from . import db

        try:
            self._sync()
        except Exception as exc:  # the offset measured last stays; the next resync tries again
            logging.getLogger("celery_scheduller").warning("cannot read the database's clock: %s", exc)
        finally:
            db.connection().close()


#: The clock of this process (web, beat or worker).
default = DatabaseClock()
