"""Django system checks: configuration that would break delivery is an error at start-up, not later."""

from __future__ import annotations

from typing import Any

from django.conf import settings as django_settings
from django.core.checks import CheckMessage, Error, register
from django.core.checks import Warning as CheckWarning
from django.utils.module_loading import import_string

from .conf import PREFIX, settings


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Serializer, Scheduller classes, time zone and the package's own settings."""
    return [*_check_serializers(), *_check_classes(), *_check_timezone(), *_check_values()]


def _check_values() -> list[CheckMessage]:
    from .exceptions import ConfigurationError

    errors: list[CheckMessage] = []
    for check in (settings.keep_finished, settings.max_in_flight, settings.response_batch_wait, settings.publish_ahead):
        try:
            check()
        except ConfigurationError as exc:
            errors.append(Error(str(exc), id="celery_scheduller.E005"))
    return errors


def _check_serializers() -> list[CheckMessage]:
    from celery import current_app

    conf = current_app.conf
    found: dict[str, Any] = {
        "task_serializer": getattr(django_settings, "CELERY_TASK_SERIALIZER", None) or conf.task_serializer,
        "accept_content": getattr(django_settings, "CELERY_ACCEPT_CONTENT", None) or conf.accept_content,
        "result_serializer": getattr(django_settings, "CELERY_RESULT_SERIALIZER", None) or conf.result_serializer,
    }
    errors: list[CheckMessage] = []
    for name, value in found.items():
        values = [value] if isinstance(value, str) else list(value or [])
        if any("pickle" in str(item) for item in values):
            errors.append(
                Error(
                    f"Celery {name} allows pickle ({value!r}).",
                    hint="celery_scheduller publishes JSON only; set CELERY_TASK_SERIALIZER = 'json' and "
                    "CELERY_ACCEPT_CONTENT = ['json'] (pickle runs code from whoever can write to the broker).",
                    id="celery_scheduller.E001",
                )
            )
    return errors


def _check_classes() -> list[CheckMessage]:
    from .scheduller import Scheduller

    errors: list[CheckMessage] = []
    seen: dict[str, str] = {}
    paths = settings.CLASSES
    if isinstance(paths, str) or not isinstance(paths, (list, tuple)):
        return [Error(f"{PREFIX}CLASSES must be a list of dotted paths, got {paths!r}.", id="celery_scheduller.E002")]
    for path in paths:
        try:
            cls = import_string(path)
        except ImportError as exc:
            errors.append(Error(f"{PREFIX}CLASSES: cannot import {path!r}: {exc}", id="celery_scheduller.E002"))
            continue
        if not (isinstance(cls, type) and issubclass(cls, Scheduller)):
            errors.append(
                Error(f"{PREFIX}CLASSES: {path!r} is not a Scheduller subclass.", id="celery_scheduller.E003")
            )
            continue
        name = cls.scheduller_name()
        if name in seen and seen[name] != path:
            errors.append(
                Error(
                    f"{PREFIX}CLASSES: {seen[name]!r} and {path!r} are both named {name!r}.",
                    hint="Give each Scheduller a distinct `name`: alarms are stored under it.",
                    id="celery_scheduller.E004",
                )
            )
        seen.setdefault(name, path)
    return errors


def _check_timezone() -> list[CheckMessage]:
    if getattr(django_settings, "USE_TZ", True):
        return []
    return [
        CheckWarning(
            "USE_TZ is False.",
            hint="Alarm times are aware datetimes in UTC; with USE_TZ off the database stores local naive times "
            "and alarms can fire hours off. Set USE_TZ = True.",
            id="celery_scheduller.W001",
        )
    ]
