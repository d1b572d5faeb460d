"""Settings, read lazily from Django's settings with the ``CELERY_SCHEDULLER_`` prefix."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.conf import settings as django_settings

PREFIX = "CELERY_SCHEDULLER_"

#: The most PUBLISH_AHEAD may be (ms): an alarm published ahead waits in a worker's memory, and on
#: Redis in the broker's unacknowledged set, for that long; a minute keeps both small and far below
#: the Redis transport's visibility timeout (an hour), after which it would be delivered again.
MAX_PUBLISH_AHEAD = 60_000

DEFAULTS: dict[str, Any] = {
    # Dotted paths of every Scheduller class that beat and workers serve.
    "CLASSES": [],
    # How often (ms) beat looks for alarms it did not load itself: late arrivals inside its window,
    # retries written by workers, attempts whose response is overdue.
    "POLL_INTERVAL": 500,
    # How many alarms one claim (one guarded UPDATE) takes at most.
    "BATCH_SIZE": 500,
    # Most published attempts awaiting their answer, across all beats (None: no limit). Beyond it beat
    # leaves due alarms pending in the database instead of queueing more than the workers can run
    # before the attempts' deadlines pass.
    "MAX_IN_FLIGHT": 1_000,
    # How long (ms) before its due time beat publishes an alarm, as a Celery task with ``eta`` at that
    # time: the worker takes it in ahead and starts it on time (0: published when due). Within this
    # much of its time an alarm is published: ``reschedule`` no longer moves it, ``cancel`` revokes it.
    "PUBLISH_AHEAD": 0,
    # After ``service_responded`` raised or returned garbage, the alarm is tried again this much later (ms).
    "ERROR_BACKOFF": 10_000,
    # While a beat handles a timed-out attempt it holds it this long (ms); if that beat dies meanwhile,
    # another one takes the attempt over after it.
    "TIMEOUT_LEASE": 15_000,
    # An alarm published more than this (ms) after its time carries ``assigns["late"] = True``.
    "LATE_AFTER": 1_000,
    # Ended alarms (finished, failed, cancelled): None removes them at once (the seed's behaviour);
    # seconds (or a timedelta) keeps them, with their attempt history, that long as history.
    "KEEP_FINISHED": None,
    # How many ended alarms one prune statement removes; beat prunes every PRUNE_INTERVAL ms.
    "PRUNE_BATCH": 1_000,
    "PRUNE_INTERVAL": 60_000,
    # Largest message (raw_request, assigns and ids as JSON, in bytes) that dispatch accepts.
    "MAX_PAYLOAD": 256 * 1024,
    # How often (ms) a beat records its windows and counters for ``scheduller_status``.
    "BEAT_RECORD_INTERVAL": 10_000,
    # How long (ms) a worker's response writer waits after a task's response for more to store with it
    # (0: store each at once). Longer batches cost the worker less per task; responses land that much later.
    "RESPONSE_BATCH_WAIT": 50,
}


class Settings:
    """The package's settings with their defaults, read from Django settings at each access."""

    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(name)
        return getattr(django_settings, PREFIX + name, DEFAULTS[name])

    def positive_ms(self, name: str) -> int:
        """A setting that must be a positive number of milliseconds."""
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            from .exceptions import ConfigurationError

            raise ConfigurationError(f"{PREFIX}{name} must be a positive integer (ms), got {value!r}")
        return value

    def keep_finished(self) -> dt.timedelta | None:
        """How long ended alarms are kept, or None to remove them at once."""
        value = self.KEEP_FINISHED
        if value is None or value == 0:
            return None
        if isinstance(value, dt.timedelta):
            return value if value > dt.timedelta(0) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            from .exceptions import ConfigurationError

            raise ConfigurationError(f"{PREFIX}KEEP_FINISHED must be None, seconds or a timedelta, got {value!r}")
        return dt.timedelta(seconds=value)

    def max_in_flight(self) -> int | None:
        """MAX_IN_FLIGHT checked: a positive integer, or None for no limit."""
        value = self.MAX_IN_FLIGHT
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            from .exceptions import ConfigurationError

            raise ConfigurationError(f"{PREFIX}MAX_IN_FLIGHT must be a positive integer or None, got {value!r}")
        return value

    def response_batch_wait(self) -> int:
        """RESPONSE_BATCH_WAIT checked: a non-negative integer of milliseconds."""
        value = self.RESPONSE_BATCH_WAIT
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            from .exceptions import ConfigurationError

            raise ConfigurationError(f"{PREFIX}RESPONSE_BATCH_WAIT must be a non-negative integer (ms), got {value!r}")
        return value

    def publish_ahead(self) -> int:
        """PUBLISH_AHEAD checked: an integer of milliseconds from 0 to MAX_PUBLISH_AHEAD."""
        value = self.PUBLISH_AHEAD
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PUBLISH_AHEAD:
            from .exceptions import ConfigurationError

            raise ConfigurationError(
                f"{PREFIX}PUBLISH_AHEAD must be an integer of milliseconds from 0 to {MAX_PUBLISH_AHEAD}, got {value!r}"
            )
        return value

    def keeps_history(self) -> bool:
        """True when ended alarms stay in the table for KEEP_FINISHED."""
        return self.keep_finished() is not None


settings = Settings()
