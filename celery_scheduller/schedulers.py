"""The beat shell: ``celery beat -S celery_scheduller.schedulers:AlarmScheduler`` (alias ``-S celery_scheduller``).

``AlarmScheduler`` runs the alarms beside Celery's own ``beat_schedule``; ``AlarmDatabaseScheduler`` runs them
beside django-celery-beat's ``PeriodicTask`` rows (``-S celery_scheduller.schedulers:AlarmDatabaseScheduler``,
with the ``beat`` extra installed and ``django_celery_beat`` in ``INSTALLED_APPS``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.beat import PersistentScheduler

logger = logging.getLogger("celery_scheduller")

#: Seconds to wait after a database or broker error before the alarm side tries again.
ERROR_PAUSE = 1.0
#: The sleep ``tick`` returns after it slept on the LISTEN connection itself (beat's loop syncs after a sleep).
IDLE_WAKE = 0.001


def _ensure_django() -> None:
    from django.apps import apps

    if not apps.ready:
        import django

        django.setup()


def _log_header_limit(broker: Any) -> None:
    """On RabbitMQ: the frame_max negotiated, which bounds a delivery's header (ids and assigns)."""
    from .conf import settings
    from .wire import FRAME_SPARE, header_limit

    limit = header_limit(broker)
    if limit is None:
        return
    from django.conf import settings as django_settings

    payload = settings.integer("MAX_PAYLOAD")
    logger.info(
        "broker frame_max %s bytes: a delivery's header (ids and assigns) may take %s bytes",
        limit + FRAME_SPARE,
        limit,
        extra={"action": "frame_max"},
    )
    if payload > limit and hasattr(django_settings, "CELERY_SCHEDULLER_MAX_PAYLOAD"):
        # set beyond it on purpose (W002); by default larger assigns are simply refused at dispatch
        logger.warning(
            "CELERY_SCHEDULLER_MAX_PAYLOAD (%s bytes) is more than this broker's header limit (%s bytes): an alarm "
            "whose assigns and ids exceed it is failed at publish, with that reason",
            payload,
            limit,
            extra={"action": "frame_max"},
        )


class AlarmSide:
    """The alarm side of a beat scheduler, mixed in before a Celery scheduler class that runs the periodic
    entries. The alarm side reads the clock once per tick; a database or broker error is logged and retried
    after ``ERROR_PAUSE`` seconds, never ending the loop."""

    app: Any
    Producer: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _ensure_django()
        from .checks import stop_on_errors

        stop_on_errors("beat")  # a configuration error stops beat here, with the check's message
        # Named apart from celery.beat.Scheduler's own attributes (``_heap`` among them).
        from .clock import DatabaseClock
        from .engine import AlarmEngine

        self.alarm_clock: DatabaseClock = kwargs.pop("alarm_clock", None) or DatabaseClock()
        self.alarm_engine = AlarmEngine(kwargs.get("app") or args[0], clock=self.alarm_clock.now)
        _serve_metrics()
        self._alarm_pause_until = 0.0
        self._alarm_producer: Any = None
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Run due alarms, then one periodic entry; return the seconds to sleep."""
        alarm_delay = self.tick_alarms(self.alarm_clock.now())
        periodic_delay: float = super().tick(*args, **kwargs)  # type: ignore[misc]
        delay = max(0.0, min(alarm_delay, periodic_delay))
        return self._sleep_listening(delay)

    def _sleep_listening(self, delay: float) -> float:
        """Beat's loop sleeps what ``tick`` returns. With a LISTEN connection, sleep on it here instead, and
        wake when an alarm is announced (an idle beat wakes only for its polls, not to look for announcements);
        return a token sleep, after which beat's loop syncs its periodic schedule as after any sleep."""
        listener = self.alarm_engine.listener
        self.alarm_engine.listens_while_idle = listener.waitable
        if delay <= IDLE_WAKE or not listener.waitable:
            return delay
        listener.wait(delay - IDLE_WAKE)
        return IDLE_WAKE

    def tick_alarms(self, now: float) -> float:
        """The alarm side of one tick at ``now`` (database time, epoch seconds); errors are logged and
        paused on, never raised."""
        if now < self._alarm_pause_until:
            return self._alarm_pause_until - now
        from django.db import DatabaseError, close_old_connections

        from . import db

        try:
            return self.alarm_engine.tick(now, self._producer_for_alarms())
        except DatabaseError:
            logger.exception("database error in beat; retrying in %ss", ERROR_PAUSE, extra={"action": "db_error"})
            close_old_connections()
            connection = db.connection()
            if connection.connection is not None and not connection.is_usable():
                connection.close()
        except Exception:
            logger.exception("alarm publishing failed; retrying in %ss", ERROR_PAUSE, extra={"action": "error"})
            self._drop_broker_connection()
        self._alarm_pause_until = now + ERROR_PAUSE
        return ERROR_PAUSE

    def _producer_for_alarms(self) -> Any:
        """One producer reused for every publish; connecting fails fast so a broker outage pauses the
        alarm side instead of blocking the whole loop in connection retries."""
        if self._alarm_producer is None:
            broker = self.app.connection_for_write()
            try:
                broker.ensure_connection(max_retries=0)
            except BaseException:
                broker.release()
                raise
            self._alarm_producer = self.Producer(broker, auto_declare=False)
            _log_header_limit(broker)
        return self._alarm_producer

    def _drop_broker_connection(self) -> None:
        producer, self._alarm_producer = self._alarm_producer, None
        if producer is not None:
            try:
                producer.connection.release()
            except Exception:
                logger.debug("releasing the broken broker connection failed", exc_info=True)

    def close(self) -> None:
        """Release the alarm producer's connection, then close the periodic side."""
        self._drop_broker_connection()
        self.alarm_engine.close()
        super().close()  # type: ignore[misc]

    @property
    def info(self) -> str:
        """Shown in beat's start-up banner."""
        from . import registry

        periodic: str = super().info  # type: ignore[misc]
        return f"    . alarms -> {', '.join(registry.names()) or '(no CELERY_SCHEDULLER_CLASSES)'}\n{periodic}"


class AlarmScheduler(AlarmSide, PersistentScheduler):
    """A beat scheduler that delivers alarms and also runs the project's ``beat_schedule`` entries, exactly
    as Celery's default scheduler does (their last run times kept in ``beat_schedule_filename``)."""


def __getattr__(name: str) -> Any:
    # Built on first use: django-celery-beat is an optional dependency (the ``beat`` extra).
    if name == "AlarmDatabaseScheduler":
        return _alarm_database_scheduler()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_database_scheduler: Any = None


def _alarm_database_scheduler() -> Any:
    """``AlarmDatabaseScheduler``: alarms beside django-celery-beat's ``PeriodicTask`` rows in one beat."""
    global _database_scheduler
    if _database_scheduler is not None:
        return _database_scheduler
    _ensure_django()
    from django.apps import apps

    from .exceptions import ConfigurationError

    try:
        from django_celery_beat.schedulers import DatabaseScheduler
    except ImportError as exc:
        raise ConfigurationError(
            "AlarmDatabaseScheduler runs django-celery-beat's periodic tasks beside the alarms, and "
            "django-celery-beat is not installed: pip install 'celery-scheduller[beat]' and add "
            "'django_celery_beat' to INSTALLED_APPS (or use -S celery_scheduller for beat_schedule entries)"
        ) from exc
    if not apps.is_installed("django_celery_beat"):
        raise ConfigurationError(
            "AlarmDatabaseScheduler needs 'django_celery_beat' in INSTALLED_APPS (and its migrations applied)"
        )

    class AlarmDatabaseScheduler(AlarmSide, DatabaseScheduler):  # type: ignore[misc]
        """A beat scheduler that delivers alarms and runs django-celery-beat's ``PeriodicTask`` rows
        (interval, crontab, solar, clocked; edits in its admin picked up as its ``DatabaseScheduler`` does)."""

    AlarmDatabaseScheduler.__module__ = __name__
    _database_scheduler = AlarmDatabaseScheduler
    return AlarmDatabaseScheduler


def _serve_metrics() -> None:
    """Serve beat's metrics where METRICS_PORT is set (once per process)."""
    from . import metrics
    from .conf import settings

    port = settings.port("METRICS_PORT")
    if port is not None:
        metrics.serve(port, "beat")
