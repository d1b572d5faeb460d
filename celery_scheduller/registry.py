"""Which Scheduller classes this project serves (``CELERY_SCHEDULLER_CLASSES``) and their instances."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from django.utils.module_loading import import_string

from .conf import settings
from .exceptions import ConfigurationError, UnknownScheduller

if TYPE_CHECKING:
    from .scheduller import Scheduller

_lock = threading.Lock()
_classes: dict[str, type[Scheduller]] | None = None
_classes_from: tuple[str, ...] | None = None
_instances: dict[str, Scheduller] = {}


def classes() -> dict[str, type[Scheduller]]:
    """Name → class for every entry of ``CELERY_SCHEDULLER_CLASSES``, imported once."""
    global _classes, _classes_from
    from .scheduller import Scheduller

    paths = tuple(settings.CLASSES)
    with _lock:
        if _classes is not None and _classes_from == paths:
            return _classes
        found: dict[str, type[Scheduller]] = {}
        for path in paths:
            try:
                cls = import_string(path)
            except ImportError as exc:
                raise ConfigurationError(f"CELERY_SCHEDULLER_CLASSES: cannot import {path!r}: {exc}") from exc
            if not (isinstance(cls, type) and issubclass(cls, Scheduller)):
                raise ConfigurationError(f"CELERY_SCHEDULLER_CLASSES: {path!r} is not a Scheduller subclass")
            name = cls.scheduller_name()
            if name in found and found[name] is not cls:
                raise ConfigurationError(f"CELERY_SCHEDULLER_CLASSES: two classes are named {name!r}")
            found[name] = cls
        if serves_django_tasks():
            from .task_backend import TaskAlarms

            found.setdefault(TaskAlarms.scheduller_name(), TaskAlarms)
        _classes, _classes_from = found, paths
        return found


def serves_django_tasks() -> bool:
    """Whether ``TASKS`` names ``AlarmTaskBackend`` (its deferred tasks are alarms of ``TaskAlarms``)."""
    from django.conf import settings as django_settings

    backends = getattr(django_settings, "TASKS", {}) or {}
    return any(str(params.get("BACKEND", "")).endswith(".AlarmTaskBackend") for params in backends.values())


def names() -> list[str]:
    """The names of every served Scheduller."""
    return list(classes())


def get(name: str) -> Scheduller:
    """The instance serving ``name``: the last one constructed in this process, else a new ``cls()``."""
    cls = classes().get(name)
    if cls is None:
        raise UnknownScheduller(f"no Scheduller named {name!r} in CELERY_SCHEDULLER_CLASSES")
    with _lock:
        instance = _instances.get(name)
    if instance is None or type(instance) is not cls:
        instance = cls()
    return instance


def serve(instance: Scheduller) -> None:
    """Make ``instance`` (and its ``state``) the one this process calls back for its name."""
    with _lock:
        _instances[instance.scheduller_name()] = instance


def check_served(cls: type[Scheduller]) -> None:
    """Raise ``UnknownScheduller`` unless ``cls`` is listed in ``CELERY_SCHEDULLER_CLASSES``."""
    name = cls.scheduller_name()
    if classes().get(name) is not cls:
        raise UnknownScheduller(
            f"{cls.__module__}.{cls.__qualname__} is not in CELERY_SCHEDULLER_CLASSES; "
            "beat and workers would never deliver its alarms"
        )
