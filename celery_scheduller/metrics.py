"""Prometheus metrics (the ``metrics`` extra, ``prometheus-client``): what beats and workers did, and gauges
of the tables, for graphs and alerts. Without ``prometheus-client`` every call here does nothing.

Labels are bounded: the Scheduller's name, the task's name, an outcome; never an alarm's id.

- beat serves ``/metrics`` on ``CELERY_SCHEDULLER_METRICS_PORT``; its scrape also reads the tables' gauges
  (``TableCollector``, at most once per ``GAUGE_CACHE`` seconds);
- a worker serves them on ``CELERY_SCHEDULLER_WORKER_METRICS_PORT`` from its main process; a prefork worker
  needs ``PROMETHEUS_MULTIPROC_DIR`` (an empty folder of its own) so that its pool processes' figures add up;
- a web process can serve the table gauges with ``celery_scheduller.metrics.view`` in its URLs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger("celery_scheduller")

try:  # the optional extra
    import prometheus_client
    from prometheus_client import Counter, Gauge, Histogram
    from prometheus_client.core import GaugeMetricFamily
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    prometheus_client = None  # type: ignore[assignment]

#: Lateness and run-time buckets (seconds): milliseconds up to five minutes.
LATENESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
RUN_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000)
#: Seconds a scrape reuses the table gauges read by the one before.
GAUGE_CACHE = 5.0
#: Each count of a table gauge stops at this many rows (a gauge at it means "at least").
GAUGE_COUNT_LIMIT = 1_000_000

PREFIX = "celery_scheduller_"
_lock = threading.RLock()


class _Metrics:
    """The package's metric objects, made once per process in the default registry."""

    def __init__(self) -> None:
        lateness = LATENESS_BUCKETS
        self.publish_lateness = Histogram(
            PREFIX + "publish_lateness_seconds",
            "Beat: publish time minus due time (0 for an alarm published ahead of its time).",
            ["scheduller"],
            buckets=lateness,
        )
        self.start_lateness = Histogram(
            PREFIX + "start_lateness_seconds",
            "Worker: task start minus due time.",
            ["scheduller", "task"],
            buckets=lateness,
        )
        self.run_time = Histogram(
            PREFIX + "task_run_seconds",
            "Worker: how long an alarm's task ran.",
            ["scheduller", "task"],
            buckets=RUN_BUCKETS,
        )
        self.callback_time = Histogram(
            PREFIX + "service_responded_seconds",
            "How long service_responded took (worker, or beat for a timeout).",
            ["scheduller"],
            buckets=RUN_BUCKETS,
        )
        self.published = Counter(PREFIX + "published", "Attempts published by beat.", ["scheduller", "task"])
        self.answered = Counter(
            PREFIX + "answered",
            "Attempts answered, by outcome (ok, error, timeout, lost, time_limit).",
            ["scheduller", "outcome"],
        )
        self.retried = Counter(PREFIX + "retried", "Next attempts stored by a Retry.", ["scheduller"])
        self.finished = Counter(PREFIX + "finished", "Alarms that ended finished.", ["scheduller"])
        self.failed = Counter(PREFIX + "failed", "Alarms that ended failed.", ["scheduller"])
        self.cancelled = Counter(PREFIX + "cancelled", "Alarms cancelled.", ["scheduller"])
        self.callback_failures = Counter(
            PREFIX + "callback_failures",
            "service_responded calls that raised, returned garbage or overran.",
            ["scheduller"],
        )
        self.window_load = Histogram(
            PREFIX + "window_load_seconds", "How long a beat's window load took.", ["scheduller"], buckets=RUN_BUCKETS
        )
        self._lazy: dict[str, Any] = {}

    # Metrics without labels are exported as soon as they exist: those only beat moves are made on first use,
    # so a worker's scrape does not show a beat's figures at zero.

    def _once(self, name: str, make: Any) -> Any:
        found = self._lazy.get(name)
        if found is None:
            with _lock:
                found = self._lazy.get(name)
                if found is None:
                    found = self._lazy[name] = make()
        return found

    @property
    def pruned(self) -> Any:
        return self._once("pruned", lambda: Counter(PREFIX + "pruned", "Ended alarms removed by pruning."))

    @property
    def claim_conflicts(self) -> Any:
        return self._once(
            "claim_conflicts",
            lambda: Counter(
                PREFIX + "claim_conflicts",
                "Alarms a beat held as due that its claim did not take: another beat claimed them, or they were "
                "cancelled or moved meanwhile.",
            ),
        )

    @property
    def claim_batch(self) -> Any:
        return self._once(
            "claim_batch",
            lambda: Histogram(PREFIX + "claim_batch_size", "Alarms one claim of a beat took.", buckets=BATCH_BUCKETS),
        )

    @property
    def last_tick(self) -> Any:
        return self._once(
            "last_tick",
            lambda: Gauge(
                PREFIX + "beat_last_tick_timestamp_seconds",
                "When this beat last ran its alarm loop (epoch seconds).",
                multiprocess_mode="max",
            ),
        )


_metrics: _Metrics | None = None


def get() -> _Metrics | None:
    """The process's metrics, made on first use; None without ``prometheus-client``."""
    global _metrics
    if prometheus_client is None:
        return None
    from .conf import settings

    if not settings.get("METRICS"):
        return None
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _Metrics()
    return _metrics


class TableCollector:
    """Gauges read from the alarm tables on scrape, per Scheduller: pending, the backlog (due, not yet
    published) and the age of its oldest alarm, in flight, failing, failed (kept). Each count stops at
    GAUGE_COUNT_LIMIT; the reading is reused for GAUGE_CACHE seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._families: list[Any] = []

    def collect(self) -> Iterator[Any]:
        with self._lock:
            if time.monotonic() - self._read_at >= GAUGE_CACHE:
                try:
                    self._families = self._read()
                except Exception:
                    logger.exception("reading the tables for the metrics failed", extra={"action": "metrics_error"})
                    self._families = []
                self._read_at = time.monotonic()
            yield from self._families

    def describe(self) -> list[Any]:
        return []  # read on scrape only, never at registration

    def _read(self) -> list[Any]:
        from . import db
        from .tables import table_gauges

        try:
            values = table_gauges(GAUGE_COUNT_LIMIT)
        finally:
            if threading.current_thread() is not threading.main_thread():
                db.connection().close()  # the HTTP server's threads come and go: no connection left open
        families = {
            key: GaugeMetricFamily(PREFIX + key, text, labels=["scheduller"])
            for key, text in (
                ("pending", "Alarms pending (counted up to a million)."),
                ("backlog", "Alarms due and not yet published (counted up to a million)."),
                ("backlog_oldest_age_seconds", "Age of the oldest alarm due and not yet published (0: none)."),
                ("in_flight", "Published attempts awaiting their answer."),
                ("failing", "Alarms on the schedule whose last answer was an error or a timeout."),
                ("failed", "Failed alarms kept as history (KEEP_FINISHED)."),
            )
        }
        for name, gauges in values.items():
            for key, family in families.items():
                family.add_metric([name], gauges[key])
        return list(families.values())


_served: set[str] = set()


def serve(port: int, role: str) -> bool:
    """Serve ``/metrics`` on ``port`` in this process (``role``: ``beat``, ``worker`` or another name for the
    log); with ``PROMETHEUS_MULTIPROC_DIR`` set, the figures of every process writing to that folder. The
    table gauges are served by beat. Returns False without ``prometheus-client``."""
    if prometheus_client is None:
        logger.warning("a metrics port is set, but prometheus-client is not installed (the metrics extra)")
        return False
    if role in _served:
        return True
    registry: Any = prometheus_client.REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    if role == "beat":
        registry.register(TableCollector())
    prometheus_client.start_http_server(port, registry=registry)
    _served.add(role)
    logger.info("serving metrics on port %s (%s)", port, role, extra={"action": "metrics", "port": port})
    return True


def process_exited(pid: int) -> None:
    """A prefork pool process exited: its live gauges are dropped (multiprocess mode only)."""
    if prometheus_client is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


_view_registry: Any = None


def view(request: Any) -> Any:
    """A Django view serving the table gauges (and this process's figures) in Prometheus' text format."""
    from django.http import HttpResponse

    global _view_registry
    if prometheus_client is None:
        return HttpResponse("prometheus-client is not installed\n", status=501, content_type="text/plain")
    if _view_registry is None:
        with _lock:
            if _view_registry is None:
                registry = prometheus_client.CollectorRegistry()
                registry.register(TableCollector())
                _view_registry = registry
    body = prometheus_client.generate_latest(_view_registry) + prometheus_client.generate_latest()
    return HttpResponse(body, content_type=prometheus_client.CONTENT_TYPE_LATEST)
