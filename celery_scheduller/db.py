"""The one database the package reads and writes: ``CELERY_SCHEDULLER_DATABASE``, else the alias Django's
routers name for writing ``Alarm`` (``default`` without routers).

Every statement, transaction and connection of the package goes through here, and the models' managers
are bound to the same alias, so a project that keeps these tables apart never has them split over two
databases. Reads go to the same alias as writes: a guarded transition must see what the last one wrote.
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.signals import setting_changed
from django.db import connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

_alias: list[str] = []  # the alias once found, until a setting it depends on changes


def alias() -> str:
    """The alias of the package's database (found once per process: every statement asks)."""
    if _alias:
        return _alias[0]
    from .conf import settings

    named: str | None = settings.get("DATABASE")
    found = named if named is not None else router.db_for_write(apps.get_model("celery_scheduller", "Alarm"))
    _alias[:] = [found]
    return found


def _setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in ("CELERY_SCHEDULLER_DATABASE", "DATABASES", "DATABASE_ROUTERS"):
        _alias.clear()


setting_changed.connect(_setting_changed)


def connection() -> BaseDatabaseWrapper:
    """This thread's connection to the package's database."""
    return connections[alias()]


def vendor() -> str:
    """``postgresql``, ``mysql``, ``sqlite``…: which SQL the package's database speaks."""
    return str(connection().vendor)


def atomic() -> Any:
    """``transaction.atomic`` on the package's database."""
    return transaction.atomic(using=alias())


def on_commit(callback: Any) -> None:
    """Run ``callback`` when the package database's transaction commits (at once outside one)."""
    transaction.on_commit(callback, using=alias())


def close_if_unusable() -> None:
    """Close this thread's connection when an error left it unusable: the next statement opens a new one
    (for long-lived processes outside Django's request cycle: a worker's main process, beat)."""
    connection().close_if_unusable_or_obsolete()
