"""What beats and workers report as alarms move: one call per event, counted in the Prometheus metrics
(``metrics``, with the ``metrics`` extra) and in the per-minute activity behind the admin's dashboard
(``activity``). Nothing here raises into beat or the worker: a failure is logged once and the event dropped."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from . import activity, metrics

logger = logging.getLogger("celery_scheduller")

_F = TypeVar("_F", bound=Callable[..., None])


def _quiet(function: _F) -> _F:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            function(*args, **kwargs)
        except Exception:
            logger.warning("recording %s failed", function.__name__, exc_info=True, extra={"action": "metrics_error"})

    return wrapper  # type: ignore[return-value]


def _recording() -> bool:
    from .conf import settings

    return settings.get("ACTIVITY_INTERVAL") is not None


@_quiet
def published(scheduller: str, task: str, lateness: float) -> None:
    """Beat published an attempt ``lateness`` seconds after its due time (negative: ahead of it)."""
    found = metrics.get()
    if found is not None:
        found.published.labels(scheduller, task).inc()
        found.publish_lateness.labels(scheduller).observe(max(0.0, lateness))
    if _recording():
        activity.default.count("published")


@_quiet
def started(scheduller: str, task: str, lateness: float) -> None:
    """A worker started an alarm's task ``lateness`` seconds after its due time."""
    found = metrics.get()
    if found is not None:
        found.start_lateness.labels(scheduller, task).observe(max(0.0, lateness))
    if _recording():
        activity.default.lateness(max(0.0, lateness))


@_quiet
def ran(scheduller: str, task: str, seconds: float) -> None:
    """An alarm's task ran for ``seconds``."""
    found = metrics.get()
    if found is not None:
        found.run_time.labels(scheduller, task).observe(seconds)


def outcome_of(status: str, error: str | None) -> str:
    """The ``answered_total`` outcome of a response: ok, timeout, lost (the worker died), time_limit, error."""
    if status != "error":
        return status
    text = error or ""
    if text.startswith("WorkerLostError"):
        return "lost"
    if text.startswith(("TimeLimitExceeded", "SoftTimeLimitExceeded")):
        return "time_limit"
    return "error"


@_quiet
def answered(scheduller: str, status: str, error: str | None) -> None:
    """A response came for an attempt (once per attempt, not again when it is decided again)."""
    outcome = outcome_of(status, error)
    found = metrics.get()
    if found is not None:
        found.answered.labels(scheduller, outcome).inc()
    if outcome != "ok" and _recording():
        activity.default.count("errors")


@_quiet
def callback(scheduller: str, seconds: float, failed: bool) -> None:
    """``service_responded`` ran for ``seconds``; ``failed``: it raised, returned garbage or overran."""
    found = metrics.get()
    if found is not None:
        found.callback_time.labels(scheduller).observe(seconds)
        if failed:
            found.callback_failures.labels(scheduller).inc()


@_quiet
def decided(scheduller: str, action: str) -> None:
    """A decision was stored: ``finished``, ``retried``, ``error_backoff`` or ``failed``."""
    found = metrics.get()
    if found is not None:
        counter = {"finished": found.finished, "retried": found.retried, "failed": found.failed}.get(action)
        if counter is not None:
            counter.labels(scheduller).inc()
    if action in ("finished", "retried", "failed") and _recording():
        activity.default.count(action)


@_quiet
def cancelled(scheduller: str, count: int) -> None:
    """``count`` alarms were cancelled."""
    found = metrics.get()
    if found is not None:
        found.cancelled.labels(scheduller).inc(count)
    if _recording():
        activity.default.count("cancelled", count)


@_quiet
def pruned(count: int) -> None:
    """Pruning removed ``count`` ended alarms."""
    found = metrics.get()
    if found is not None:
        found.pruned.inc(count)  # 0 too: a beat that prunes exports the counter from its first pass


@_quiet
def claimed(batch: int, conflicts: int) -> None:
    """A beat's claim took ``batch`` alarms; ``conflicts`` it held as due were not among them."""
    found = metrics.get()
    if found is not None:
        found.claim_batch.observe(batch)
        if conflicts:
            found.claim_conflicts.inc(conflicts)


@_quiet
def window_loaded(scheduller: str, seconds: float) -> None:
    """A beat loaded a window of ``scheduller``'s alarms in ``seconds``."""
    found = metrics.get()
    if found is not None:
        found.window_load.labels(scheduller).observe(seconds)


@_quiet
def ticked(now: float) -> None:
    """A beat ran its alarm loop at ``now`` (epoch seconds)."""
    found = metrics.get()
    if found is not None:
        found.last_tick.set(now)
