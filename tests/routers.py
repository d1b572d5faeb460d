"""Database routers for the tests of the package's database alias."""

from __future__ import annotations

from typing import Any


class AlarmsRouter:
    """The package's models on the ``alarms`` database, and migrated only there."""

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return "alarms" if model._meta.app_label == "celery_scheduller" else None

    db_for_write = db_for_read

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        if app_label == "celery_scheduller":
            return db == "alarms"
        return None


class NoAlarmTablesRouter:
    """Migrates the package's models nowhere: E007's case."""

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        return False if app_label == "celery_scheduller" else None
