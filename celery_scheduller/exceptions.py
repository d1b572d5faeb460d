"""The package's errors: one tree, so callers can catch all of them at once."""

from __future__ import annotations


class SchedullerError(Exception):
    """Base class of every error raised by celery_scheduller."""


class ConfigurationError(SchedullerError):
    """The project's settings do not describe a usable setup."""


class InvalidAlarm(SchedullerError, ValueError):
    """An alarm given to ``dispatch`` cannot be stored as it is.

    Raised at the call, before anything is written, so nothing already stored is lost.
    """


class UnknownScheduller(ConfigurationError):
    """A Scheduller that is not listed in ``CELERY_SCHEDULLER_CLASSES`` was asked to act."""


class InvalidResponse(SchedullerError):
    """``service_responded`` returned something other than ``OK``, a valid ``Retry`` or a ``Fail``."""


class ClaimConflict(SchedullerError):
    """A guarded update changed fewer rows than were locked for it; the whole claim is rolled back."""


class PublishFailed(SchedullerError):
    """The broker refused a publish; the claimed attempts were released to pending."""
