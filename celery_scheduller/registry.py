"""Which Scheduller classes this project serves (``CELERY_SCHEDULLER_CLASSES``) and their instances.

Imports no Scheduller code: ``Scheduller`` subclasses make themselves known here as they are defined
(``known``), and the Django Tasks backend's class is a dotted path like any configured one.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from django.utils.module_loading import import_string

from .conf import settings
from .exceptions import ConfigurationError, UnknownScheduller

if TYPE_CHECKING:
    from .scheduller import Scheduller

_lock = threading.Lock()
_classes: dict[str, type[Scheduller]] | None = None
_classes_from: tuple[str, ...] | None = None
#: per class: the state its callbacks run on in this process, and the instance built with it
_states: dict[type[Scheduller], Any] = {}
_instances: dict[type[Scheduller], Scheduller] = {}
#: every Scheduller subclass defined in this process
_subclasses: set[type[Scheduller]] = set()
#: served as well when TASKS names the Django Tasks backend
TASK_ALARMS = "celery_scheduller.task_backend.TaskAlarms"
TASK_BACKEND = "celery_scheduller.task_backend.AlarmTaskBackend"
#: ``TASKS``' backend paths → whether one of them is ``AlarmTaskBackend`` or a subclass
_serves_tasks: dict[tuple[str, ...], bool] = {}


def known(cls: type[Scheduller]) -> None:
    """Called by ``Scheduller.__init_subclass__``: ``cls`` may be served."""
    _subclasses.add(cls)


def classes() -> dict[str, type[Scheduller]]:
    """Name → class for every entry of ``CELERY_SCHEDULLER_CLASSES``, imported once."""
    global _classes, _classes_from
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
            if not (isinstance(cls, type) and cls in _subclasses):
                raise ConfigurationError(f"CELERY_SCHEDULLER_CLASSES: {path!r} is not a Scheduller subclass")
            name = cls.scheduller_name()
            if name in found and found[name] is not cls:
                raise ConfigurationError(f"CELERY_SCHEDULLER_CLASSES: two classes are named {name!r}")
            found[name] = cls
        if serves_django_tasks():
            task_alarms: type[Scheduller] = import_string(TASK_ALARMS)
            found.setdefault(task_alarms.scheduller_name(), task_alarms)
        _classes, _classes_from = found, paths
        return found


def serves_django_tasks() -> bool:
    """Whether ``TASKS`` names ``AlarmTaskBackend`` or a subclass of it (its deferred tasks are alarms of
    ``TaskAlarms``)."""
    from django.conf import settings as django_settings

    backends = getattr(django_settings, "TASKS", {}) or {}
    paths = tuple(str(params.get("BACKEND", "")) for params in backends.values())
    if paths not in _serves_tasks:
        _serves_tasks[paths] = _names_our_backend(paths)
    return _serves_tasks[paths]


def _names_our_backend(paths: tuple[str, ...]) -> bool:
    """Whether one of these ``BACKEND`` paths is ``AlarmTaskBackend`` or a subclass."""
    if not paths:
        return False
    try:
        ours = import_string(TASK_BACKEND)
    except ImportError:  # Django 5.2 without the django-tasks backport: no backend of ours can be named
        return False
    for path in paths:
        try:
            backend = import_string(path)
        except ImportError:
            continue  # Django reports a backend it cannot import when it is used
        if isinstance(backend, type) and issubclass(backend, ours):
            return True
    return False


def names() -> list[str]:
    """The names of every served Scheduller."""
    return list(classes())


def get(name: str) -> Scheduller:
    """The instance whose callbacks serve ``name`` in this process: one per class, built with the class's
    state (``served_state``). Constructing more instances, with or without that state, does not change it."""
    cls = classes().get(name)
    if cls is None:
        raise UnknownScheduller(f"no Scheduller named {name!r} in CELERY_SCHEDULLER_CLASSES")
    with _lock:
        instance = _instances.get(cls)
    if instance is None:
        instance = cls(state=served_state(cls))
        with _lock:
            instance = _instances.setdefault(cls, instance)
    return instance


def served_state(cls: type[Scheduller]) -> Any:
    """The state ``cls``'s callbacks run on here (None until a construction gave one)."""
    with _lock:
        return _states.get(cls)


def serve(cls: type[Scheduller], state: Any, *, replace: bool = False) -> None:
    """Record ``state`` as the one ``cls``'s callbacks run on in this process.

    The first construction with a state sets it; a later one with a different state is refused (as the seed
    refuses a second ``start_link``), so no view or thread can swap it under a running callback.
    ``replace`` (``Scheduller.use_state``) swaps it on purpose: callbacks already running keep the old one.
    """
    if state is None and not replace:
        return
    with _lock:
        if not replace and _states.get(cls) is not None and not _same(_states[cls], state):
            raise ConfigurationError(
                f"{cls.__qualname__} already serves this process with another state; construct it with its "
                f"state once (at module level) or call {cls.__qualname__}.use_state(...) to replace it"
            )
        _states[cls] = state
        if replace:
            _instances.pop(cls, None)


def _same(current: Any, state: Any) -> bool:
    try:
        return bool(current is state or current == state)
    except Exception:  # a state whose == raises is compared by identity
        return False


def check_served(cls: type[Scheduller]) -> None:
    """Raise ``UnknownScheduller`` unless ``cls`` is listed in ``CELERY_SCHEDULLER_CLASSES``."""
    name = cls.scheduller_name()
    if classes().get(name) is not cls:
        raise UnknownScheduller(
            f"{cls.__module__}.{cls.__qualname__} is not in CELERY_SCHEDULLER_CLASSES; "
            "beat and workers would never deliver its alarms"
        )
