"""Settings: each ``CELERY_SCHEDULLER_<NAME>`` with its default, unit and bounds, checked once per process.

``settings.get(name)`` returns a setting checked against its spec (a ``ConfigurationError`` in the
setting's own unit otherwise); the system check ``celery_scheduller.E005`` runs every spec at start-up,
so a bad value stops ``manage.py``, beat and workers before any alarm is touched. The settings reference
in the docs is generated from ``SPECS``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed

from .exceptions import ConfigurationError

PREFIX = "CELERY_SCHEDULLER_"

#: The most PUBLISH_AHEAD may be (ms): an alarm published ahead waits in a worker's memory, and on
#: Redis in the broker's unacknowledged set, for that long; a minute keeps both small and far below
#: the Redis transport's visibility timeout (an hour), after which it would be delivered again.
MAX_PUBLISH_AHEAD = 60_000


@dataclasses.dataclass(frozen=True, slots=True)
class Spec:
    """One setting: its default, the unit its value is in, its bounds, and what it does."""

    name: str
    default: Any
    unit: str  # "ms", "alarms", "bytes", "failures", "seconds", "port", "bool" or "" (anything else)
    doc: str
    minimum: int = 1
    maximum: int | None = None
    none_allowed: bool = False

    def check(self, value: Any) -> Any:
        """``value`` if it fits this spec; ``ConfigurationError`` naming the setting and its unit."""
        if value is None and self.none_allowed:
            return None
        if self.name == "DATABASE":
            if not isinstance(value, str) or value not in django_settings.DATABASES:
                raise ConfigurationError(
                    f"{PREFIX}DATABASE must be None or an alias in DATABASES "
                    f"({', '.join(sorted(django_settings.DATABASES))}), got {value!r}"
                )
            return value
        if self.unit == "":
            return value
        if self.unit == "bool":
            if not isinstance(value, bool):
                raise ConfigurationError(f"{PREFIX}{self.name} must be True or False, got {value!r}")
            return value
        if self.name == "KEEP_FINISHED" and isinstance(value, dt.timedelta):
            if value < dt.timedelta(0):
                raise ConfigurationError(f"{PREFIX}{self.name} must not be negative, got {value!r}")
            return value
        number_ok = not isinstance(value, bool) and isinstance(value, (int, float) if self.unit == "seconds" else int)
        if not number_ok or value < self.minimum or (self.maximum is not None and value > self.maximum):
            bounds = f"from {self.minimum:,}" + (f" to {self.maximum:,}" if self.maximum is not None else " up")
            kind = "a number" if self.unit == "seconds" else "an integer"
            also = " or None" if self.none_allowed else ""
            also += " or a timedelta" if self.name == "KEEP_FINISHED" else ""
            what = "a TCP port" if self.unit == "port" else f"{kind} of {self.unit}"
            raise ConfigurationError(f"{PREFIX}{self.name} must be {what} {bounds}{also}, got {value!r}")
        return value


SPECS: tuple[Spec, ...] = (
    Spec("CLASSES", [], "", "Dotted paths of every Scheduller class that beat and workers serve."),
    Spec(
        "DATABASE",
        None,
        "",
        "The alias (a key of ``DATABASES``) of the database every alarm table, statement and transaction of "
        "the package uses. None: the alias the database routers give for writing ``Alarm`` (``default`` "
        "without routers). Reads use it too.",
        none_allowed=True,
    ),
    Spec(
        "POLL_INTERVAL",
        500,
        "ms",
        "How often beat looks for alarms it did not load itself: late arrivals inside its window, retries "
        "written by workers, attempts whose response is overdue.",
    ),
    Spec("BATCH_SIZE", 500, "alarms", "How many alarms one claim (one guarded UPDATE) takes at most.", maximum=100_000),
    Spec(
        "MAX_IN_FLIGHT",
        1_000,
        "alarms",
        "Most attempts due and awaiting their answer, across all beats (None: no limit). Beyond it beat leaves "
        "due alarms pending instead of queueing more than the workers can run before their deadlines pass. An "
        "attempt published ahead (PUBLISH_AHEAD) counts from its due time: until then the lead bounds them.",
        none_allowed=True,
    ),
    Spec(
        "PUBLISH_AHEAD",
        1_000,
        "ms",
        "How long before its due time beat publishes an alarm, as a Celery task with ``eta`` at that time, "
        "which the worker holds and starts on time (0: published when due, as a task without ``eta``). "
        "``cancel`` and ``reschedule`` keep their meaning while a worker holds it: it is revoked, and the "
        "worker runs it only if it is still its alarm's published attempt when due.",
        minimum=0,
        maximum=MAX_PUBLISH_AHEAD,
    ),
    Spec(
        "PUBLISH_AHEAD_MAX",
        10_000,
        "ms",
        "How far ahead beat publishes a burst: when some second within this much time has more than 1,000 "
        "alarms due (``planning.BURST``), beat publishes every alarm due up to the end of that second at once, "
        "so the workers take the burst in before it is due rather than while it runs. Not more than it: "
        "PUBLISH_AHEAD for the rest. 0, or at most PUBLISH_AHEAD, or PUBLISH_AHEAD = 0: never earlier than "
        "PUBLISH_AHEAD.",
        minimum=0,
        maximum=MAX_PUBLISH_AHEAD,
    ),
    Spec(
        "ERROR_BACKOFF",
        10_000,
        "ms",
        "After ``service_responded`` raised, returned something else than OK, a valid Retry or Fail, or overran "
        "CALLBACK_BUDGET, it is called again with the same response this much later (the task does not run "
        "again), doubled for each further failure in a row up to ERROR_BACKOFF_MAX, less a random part of up to "
        "a half.",
    ),
    Spec("ERROR_BACKOFF_MAX", 600_000, "ms", "The longest error back-off."),
    Spec(
        "CALLBACK_MAX_FAILURES",
        10,
        "failures",
        "After this many ``service_responded`` failures in a row the alarm is failed, with the last error.",
    ),
    Spec(
        "CALLBACK_BUDGET",
        5_000,
        "ms",
        "How long beat lets ``service_responded`` run for a timed-out attempt; past it the call counts as a "
        "failure. Must be less than TIMEOUT_LEASE.",
    ),
    Spec(
        "TIMEOUT_LEASE",
        15_000,
        "ms",
        "While a beat answers a timed-out attempt it holds it this long; if that beat dies meanwhile, another "
        "one takes the attempt over after it.",
    ),
    Spec("LATE_AFTER", 1_000, "ms", 'An alarm published more than this after its time carries ``assigns["late"]``.', 0),
    Spec(
        "KEEP_FINISHED",
        None,
        "seconds",
        "Ended alarms (finished, failed, cancelled): None removes them at once (the seed's behaviour); "
        "seconds (or a timedelta) keeps them, with their attempt history, that long.",
        minimum=0,
        none_allowed=True,
    ),
    Spec(
        "DISPATCH_TIMEOUT",
        5_000,
        "ms",
        "How long a published attempt's response is awaited (the seed's 5 s), for every Scheduller that does not "
        "override ``dispatch_timeout()``. An attempt still running past it is answered as a ``timeout``; its "
        "late result is ignored (system check W003 names tasks whose time limit is longer).",
    ),
    Spec(
        "PRUNE_BATCH",
        1_000,
        "alarms",
        "How many ended alarms (with their history), or expired Django Tasks results, one prune statement "
        "removes: the most rows one short transaction locks. A pass runs such statements back to back until "
        "one comes back short.",
    ),
    Spec(
        "PRUNE_INTERVAL",
        10_000,
        "ms",
        "How long beat's pruner rests once it has caught up; also the most a pass runs before it reports "
        "itself behind (a warning, then the next pass at once).",
    ),
    Spec(
        "MAX_PAYLOAD",
        256 * 1024,
        "bytes",
        "Largest message (raw_request, assigns and ids as JSON) that dispatch and a Retry accept.",
    ),
    Spec("BEAT_RECORD_INTERVAL", 10_000, "ms", "How often a beat records its windows and counters for the status."),
    Spec(
        "METRICS",
        True,
        "bool",
        "Record the Prometheus metrics where ``prometheus-client`` is installed (False: record none, whatever "
        "is installed).",
    ),
    Spec(
        "METRICS_PORT",
        None,
        "port",
        "The TCP port on which beat serves its Prometheus metrics at ``/metrics``, with the table gauges "
        "(pending, backlog, in flight…); None: not served. Needs the ``metrics`` extra. Two beats on one host "
        "need two ports.",
        maximum=65_535,
        none_allowed=True,
    ),
    Spec(
        "WORKER_METRICS_PORT",
        None,
        "port",
        "The TCP port on which a worker's main process serves its Prometheus metrics; None: not served. A "
        "prefork worker also needs ``PROMETHEUS_MULTIPROC_DIR`` (see the operations guide).",
        maximum=65_535,
        none_allowed=True,
    ),
    Spec(
        "ACTIVITY_INTERVAL",
        10_000,
        "ms",
        "How often each beat and worker process writes its per-minute counts (published, finished, retried, "
        "failed, start lateness) for the admin's dashboard; None: not counted, the dashboard's activity "
        "charts stay empty.",
        none_allowed=True,
    ),
    Spec(
        "RESPONSE_BATCH_WAIT",
        50,
        "ms",
        "How long a worker's response writer waits after a task's response for more to store with it "
        "(0: store each at once).",
        minimum=0,
    ),
    Spec(
        "WORKER_GC_FREEZE",
        True,
        "bool",
        "Once a worker process has started (``worker_ready``; a prefork child at ``worker_process_init``), "
        "it moves every object it holds then (modules, Django's and Celery's own) out of the garbage "
        "collector's view (``gc.freeze()``): the collector's full passes then scan only what came later, so "
        "they pause the loop that starts held alarms for a few ms rather than tens. What is frozen is never "
        "collected. False: the collector as Python sets it.",
    ),
    Spec(
        "WORKER_PRECISE_WAKE",
        True,
        "bool",
        "A worker's event loop sleeps in the poller with a timeout in whole milliseconds, rounded up, so a "
        "task held for its ``eta`` starts up to a millisecond after it (half of one on average). With this "
        "on, where a held alarm comes due before the loop would wake, the loop polls to the last whole "
        "millisecond before its timer and waits the rest on the poller's descriptor with ``select``, which "
        "counts microseconds (``prefetch.PrecisePoll``; an event still ends the wait at once; Linux's epoll "
        "poller only). It steps aside while the loop works more than 45 % of the time (over half a second), "
        "where waking for each due time would add turns to a loop near its limit. False: the loop wakes on its "
        "own timeout, as for any ``eta`` task.",
    ),
)

_SPECS = {spec.name: spec for spec in SPECS}
#: name → default, for code that wants the defaults alone
DEFAULTS: dict[str, Any] = {spec.name: spec.default for spec in SPECS}


class Settings:
    """The package's settings, each read from Django settings and checked against its spec once, then kept
    until Django's ``setting_changed`` (tests' ``override_settings``) says it changed."""

    def __init__(self) -> None:
        self._checked: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        """The setting ``name`` (without the prefix), checked; ``ConfigurationError`` if it does not fit."""
        try:
            return self._checked[name]
        except KeyError:
            pass
        spec = _SPECS[name]
        value = spec.check(getattr(django_settings, PREFIX + name, spec.default))
        self._checked[name] = value
        return value

    def changed(self, setting: str) -> None:
        """Forget what was read of ``setting`` (a Django setting's name)."""
        if setting.startswith(PREFIX):
            self._checked.pop(setting.removeprefix(PREFIX), None)
        elif setting == "DATABASES":
            self._checked.pop("DATABASE", None)

    def integer(self, name: str) -> int:
        """``get`` of a setting whose value is an integer (ms, alarms, bytes…)."""
        value = self.get(name)
        if not isinstance(value, int):
            raise ConfigurationError(f"{PREFIX}{name} must be set here, got {value!r}")
        return value

    def __getattr__(self, name: str) -> Any:
        if name not in _SPECS:
            raise AttributeError(name)
        return self.get(name)

    def problems(self) -> list[str]:
        """Every setting that does not fit its spec, and the pairs that do not fit together."""
        found = []
        for spec in SPECS:
            try:
                self.get(spec.name)
            except ConfigurationError as exc:
                found.append(str(exc))
        if found:
            return found
        if self.get("CALLBACK_BUDGET") >= self.get("TIMEOUT_LEASE"):
            found.append(f"{PREFIX}CALLBACK_BUDGET (ms) must be less than {PREFIX}TIMEOUT_LEASE (ms)")
        if self.get("ERROR_BACKOFF") > self.get("ERROR_BACKOFF_MAX"):
            found.append(f"{PREFIX}ERROR_BACKOFF (ms) must not be more than {PREFIX}ERROR_BACKOFF_MAX (ms)")
        return found

    def keep_finished(self) -> dt.timedelta | None:
        """How long ended alarms are kept, or None to remove them at once."""
        value = self.get("KEEP_FINISHED")
        if value is None or value == 0:
            return None
        if isinstance(value, dt.timedelta):
            return value if value > dt.timedelta(0) else None
        return dt.timedelta(seconds=value)

    def keeps_history(self) -> bool:
        """True when ended alarms stay in the table for KEEP_FINISHED."""
        return self.keep_finished() is not None

    def max_in_flight(self) -> int | None:
        """MAX_IN_FLIGHT: a positive integer, or None for no limit."""
        value: int | None = self.get("MAX_IN_FLIGHT")
        return value

    def publish_ahead(self) -> int:
        """PUBLISH_AHEAD (ms), from 0 to MAX_PUBLISH_AHEAD."""
        value: int = self.get("PUBLISH_AHEAD")
        return value

    def publish_ahead_max(self) -> int:
        """PUBLISH_AHEAD_MAX (ms), from 0 to MAX_PUBLISH_AHEAD."""
        value: int = self.get("PUBLISH_AHEAD_MAX")
        return value

    def port(self, name: str) -> int | None:
        """A port setting (METRICS_PORT, WORKER_METRICS_PORT), or None when not set."""
        value: int | None = self.get(name)
        return value

    def response_batch_wait(self) -> int:
        """RESPONSE_BATCH_WAIT (ms)."""
        value: int = self.get("RESPONSE_BATCH_WAIT")
        return value


settings = Settings()


def _setting_changed(*, setting: str, **kwargs: Any) -> None:
    settings.changed(setting)


setting_changed.connect(_setting_changed)
