"""celery_scheduller: durable delivery of Celery tasks at a point in time in the future.

The X3m System ``Scheduller`` behaviour for Django + Celery. See README.md.
"""

from __future__ import annotations

from .exceptions import ConfigurationError, InvalidAlarm, InvalidResponse, SchedullerError, UnknownScheduller
from .message import Message, Response
from .scheduller import OK, Fail, Retry, Scheduller

__version__ = "0.1.0"

__all__ = [
    "OK",
    "ConfigurationError",
    "Fail",
    "InvalidAlarm",
    "InvalidResponse",
    "Message",
    "Response",
    "Retry",
    "Scheduller",
    "SchedullerError",
    "UnknownScheduller",
    "current_message",
]


def __getattr__(name: str) -> object:
    # The hooks import the models; loading them lazily keeps ``import celery_scheduller`` safe
    # while Django is still reading INSTALLED_APPS.
    if name == "current_message":
        from .hooks import current_message

        return current_message
    raise AttributeError(f"module 'celery_scheduller' has no attribute {name!r}")
