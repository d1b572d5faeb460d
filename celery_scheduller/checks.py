"""Django system checks: configuration that would break delivery is an error at start-up, not later."""

from __future__ import annotations

from typing import Any

from django.conf import settings as django_settings
from django.core.checks import CheckMessage, Error, register
from django.core.checks import Warning as CheckWarning
from django.utils.module_loading import import_string

from .conf import PREFIX, settings

#: the Django Tasks runner (``task_backend.RUNNER``), named here so the checks do not import the backend
RUNNER = "celery_scheduller.run_django_task"


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Serializer, Scheduller classes, time zone and the package's own settings."""
    return [
        *_check_serializers(),
        *_check_classes(),
        *_check_timezone(),
        *_check_values(),
        *_check_broker(),
        *_check_driver(),
        *_check_database(),
        *_check_time_limits(),
    ]


def _check_time_limits() -> list[CheckMessage]:
    """W003: a task whose Celery time limit is longer than DISPATCH_TIMEOUT would be answered as a timeout
    (and retried, by most ``service_responded``) while it still runs, if a Scheduller with the default
    ``dispatch_timeout`` delivers it."""
    from .checking import known_tasks
    from .registry import classes
    from .scheduller import Scheduller

    try:
        served = classes().values()
    except Exception:
        return []  # E002–E004 report it
    if all(cls.dispatch_timeout is not Scheduller.dispatch_timeout for cls in served):
        return []  # every Scheduller sets its own timeout
    try:
        timeout_s = settings.integer("DISPATCH_TIMEOUT") / 1000
        conf = _celery_conf()
        names = known_tasks() or set()
        from . import compat

        app = compat.current_celery_app()
    except Exception:
        return []
    found: list[CheckMessage] = []
    for name in sorted(names):
        if name.startswith("celery.") or name == RUNNER:
            continue  # Celery's own; the Django Tasks runner, whose alarms wait TIMEOUT_MS (TaskAlarms)
        task = app.tasks[name]
        limits = {
            "time_limit": getattr(task, "time_limit", None) or getattr(conf, "task_time_limit", None),
            "soft_time_limit": getattr(task, "soft_time_limit", None) or getattr(conf, "task_soft_time_limit", None),
        }
        longer = {kind: value for kind, value in limits.items() if value and float(value) > timeout_s}
        if longer:
            said = ", ".join(f"{kind}={value:g} s" for kind, value in longer.items())
            found.append(
                CheckWarning(
                    f"Task {name!r} may run longer ({said}) than {PREFIX}DISPATCH_TIMEOUT ({timeout_s:g} s): an "
                    "alarm delivering it is answered as a timeout while it still runs, and its result ignored.",
                    hint=f"Raise {PREFIX}DISPATCH_TIMEOUT, or override dispatch_timeout() on the Scheduller that "
                    "delivers it (ignore this if no Scheduller does).",
                    id="celery_scheduller.W003",
                )
            )
    return found


def errors_at_start() -> list[str]:
    """The package's checks that are errors, one line each as ``manage.py check`` words them: beat and the
    workers refuse to start on any of them (``stop_on_errors``)."""
    found = [*_check_serializers(), *_check_classes(), *_check_values(), *_check_driver(), *_check_database()]
    return [
        f"{message.id}: {message.msg}" + (f" HINT: {message.hint}" if message.hint else "")
        for message in found
        if message.is_serious()
    ]


def stop_on_errors(process: str) -> None:
    """Stop ``process`` (beat, a worker) at start with the checks' errors: one line each on stderr, exit
    status 1, no traceback. Run when beat builds its scheduler and when a worker starts (``worker_init``)."""
    found = errors_at_start()
    if found:
        lines = "\n".join(f"celery_scheduller: {process} not started: {line}" for line in found)
        raise SystemExit(lines)


def _check_database() -> list[CheckMessage]:
    """The package's database (``DATABASE``, else the routers' alias for ``Alarm``) must hold its tables."""
    from django.db import router

    from . import db
    from .models import Alarm

    try:
        alias = db.alias()
    except Exception:
        return []  # an invalid DATABASE: reported by E005
    if router.allow_migrate_model(alias, Alarm):
        return []
    return [
        Error(
            f"celery_scheduller uses the database {alias!r}, but the database routers do not migrate its tables there.",
            hint=f"Let a router's allow_migrate() return True for app 'celery_scheduller' on {alias!r}, or set "
            f"{PREFIX}DATABASE to the alias that holds its tables; then run `manage.py migrate --database <alias>`.",
            id="celery_scheduller.E007",
        )
    ]


def _check_driver() -> list[CheckMessage]:
    """On PostgreSQL the package's statements need psycopg 3 (server-side binding, pipelines, LISTEN)."""
    from . import db

    try:
        if db.vendor() != "postgresql":
            return []
    except Exception:
        return []  # an invalid DATABASE: reported by E005
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return [
            Error(
                "celery_scheduller needs psycopg 3 on PostgreSQL; only psycopg2 is installed.",
                hint="pip install 'celery-scheduller[postgres]' (psycopg[binary,pool]); Django uses psycopg 3 "
                "when both are installed.",
                id="celery_scheduller.E006",
            )
        ]
    return []


def _check_broker() -> list[CheckMessage]:
    """RabbitMQ carries a delivery's header (ids and assigns) in one frame: MAX_PAYLOAD should fit in it."""
    from .wire import configured_header_limit

    fits = configured_header_limit(_celery_conf())
    if fits is None or not hasattr(django_settings, f"{PREFIX}MAX_PAYLOAD"):
        # the default: raw_request travels in the body, and larger assigns are refused at dispatch
        return []
    try:
        payload = settings.integer("MAX_PAYLOAD")
    except Exception:
        return []  # reported by E005
    if payload <= fits:
        return []
    return [
        CheckWarning(
            f"{PREFIX}MAX_PAYLOAD ({payload:,} bytes) is more than RabbitMQ's frame_max leaves for a "
            f"delivery's header ({fits:,} bytes).",
            hint=f"Alarms whose assigns and ids exceed {fits:,} bytes as JSON are refused at dispatch on this "
            f"broker. Set {PREFIX}MAX_PAYLOAD = {fits} to say so, or raise frame_max on the server and in "
            "CELERY_BROKER_TRANSPORT_OPTIONS; beat logs the frame_max it negotiated at start.",
            id="celery_scheduller.W002",
        )
    ]


def _check_values() -> list[CheckMessage]:
    return [Error(problem, id="celery_scheduller.E005") for problem in settings.problems()]


def _celery_conf() -> Any:
    """The Celery app's effective configuration: what ``app.conf`` holds after the project's
    ``config_from_object``, plus whatever was set on the app in code (``app.conf.accept_content = …``)."""
    from celery import current_app

    return current_app.conf


def _check_serializers() -> list[CheckMessage]:
    conf = _celery_conf()
    found: dict[str, Any] = {
        "task_serializer": conf.task_serializer,
        "accept_content": conf.accept_content,
        "result_serializer": conf.result_serializer,
        "result_accept_content": conf.result_accept_content,
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
