"""OpenTelemetry traces (the OpenTelemetry API; nothing is recorded without an SDK configured in the process).

- ``dispatch`` stores the trace context current at that moment with the alarm, in
  ``assigns["celery_scheduller.trace"]`` (W3C ``traceparent``/``tracestate``): it survives restarts and
  ``Retry``, minutes or months later.
- beat publishes each attempt in a ``celery_scheduller.publish`` span whose parent is that context, and
  puts the span's own context in the task's headers (``traceparent``), where
  ``opentelemetry-instrumentation-celery`` on the worker finds it;
- the worker runs the task in a ``celery_scheduller.run`` span, a child of beat's publish span (or of the
  stored context) and linked to the request that scheduled it; spans the task makes are its children;
- ``service_responded`` runs in a ``celery_scheduller.service_responded`` span.

Every span carries the alarm's ids as attributes: ``celery_scheduller.message_id``,
``celery_scheduller.scheduller``, ``celery_scheduller.attempt``, ``celery_scheduller.correlation_id`` and
``celery_scheduller.task``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
except ImportError:  # pragma: no cover - exercised where opentelemetry-api is not installed
    trace = None  # type: ignore[assignment]

#: The assigns key holding the trace context of the request that dispatched the alarm.
TRACE_KEY = "celery_scheduller.trace"
#: Header names of the W3C trace context.
TRACE_HEADERS = ("traceparent", "tracestate")

#: The worker's span of the running alarm task: ``service_responded``'s parent. Kept apart from OpenTelemetry's
#: current context, which other instrumentation (Celery's) attaches and detaches around the same task.
_run_span: contextvars.ContextVar[Any] = contextvars.ContextVar("celery_scheduller_run_span", default=None)


def carrier() -> dict[str, str] | None:
    """The current trace context as W3C headers, or None without a recording span (no SDK, no trace)."""
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    found: dict[str, str] = {}
    propagate.inject(found)
    return {key: value for key, value in found.items() if key in TRACE_HEADERS} or None


def carry(assigns: dict[str, Any]) -> None:
    """At dispatch: store the current trace context in ``assigns`` (an alarm carrying one keeps its own)."""
    if TRACE_KEY not in assigns:
        found = carrier()
        if found is not None:
            assigns[TRACE_KEY] = found


def _stored(assigns: Mapping[str, Any]) -> dict[str, str] | None:
    stored = assigns.get(TRACE_KEY)
    if isinstance(stored, Mapping) and isinstance(stored.get("traceparent"), str):
        return {key: str(stored[key]) for key in TRACE_HEADERS if isinstance(stored.get(key), str)}
    return None


def _attributes(message: Any, scheduller: str, attempt: int) -> dict[str, Any]:
    return {
        "celery_scheduller.message_id": message.id,
        "celery_scheduller.scheduller": scheduller,
        "celery_scheduller.attempt": attempt,
        "celery_scheduller.correlation_id": message.correlation_id,
        "celery_scheduller.task": message.service_name,
    }


def _tracer() -> Any:
    return trace.get_tracer("celery_scheduller")


@contextlib.contextmanager
def publishing(scheduller: str, attempt: int, message: Any, headers: MutableMapping[str, Any]) -> Iterator[None]:
    """Beat: publish one attempt in a span under the alarm's stored context; its context goes in ``headers``."""
    stored = None if trace is None else _stored(message.assigns)
    if stored is None:
        yield
        return
    parent = propagate.extract(stored)
    span = _tracer().start_span(
        "celery_scheduller.publish",
        context=parent,
        kind=trace.SpanKind.PRODUCER,
        attributes=_attributes(message, scheduller, attempt),
    )
    with trace.use_span(span, end_on_exit=True):
        propagate.inject(headers)
        yield


def start_run(scheduller: str, attempt: int, message: Any, request: Any) -> Any:
    """Worker: open the task's span (under beat's publish span from the task's headers, else the stored
    context; linked to the stored context) and make it current; returns what ``end_run`` needs, or None."""
    stored = None if trace is None else _stored(message.assigns)
    if stored is None:
        return None
    published = {key: value for key in TRACE_HEADERS if isinstance(value := _header(request, key), str)}
    origin = trace.get_current_span(propagate.extract(stored)).get_span_context()
    parent = propagate.extract(published if "traceparent" in published else stored)
    span = _tracer().start_span(
        f"celery_scheduller.run {message.service_name}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes=_attributes(message, scheduller, attempt),
        links=[trace.Link(origin, {"celery_scheduller.link": "dispatch"})] if origin.is_valid else None,
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    _run_span.set(span)
    return span, token


def end_run(started: Any, error: BaseException | None = None) -> None:
    """Worker: close what ``start_run`` opened."""
    if started is None:
        return
    span, token = started
    _run_span.set(None)
    if error is not None:
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
    if trace.get_current_span() is span:  # not when other instrumentation reset the context meanwhile
        otel_context.detach(token)
    span.end()


@contextlib.contextmanager
def responding(scheduller: str, attempt: int, message: Any) -> Iterator[None]:
    """``service_responded`` in a span: under the worker's run span, else (beat) under the stored context."""
    stored = None if trace is None else _stored(message.assigns)
    if stored is None:
        yield
        return
    running = _run_span.get()
    parent = trace.set_span_in_context(running) if running is not None else propagate.extract(stored)
    with _tracer().start_as_current_span(
        "celery_scheduller.service_responded", context=parent, attributes=_attributes(message, scheduller, attempt)
    ):
        yield


def _header(request: Any, key: str) -> Any:
    # protocol 2 makes a message's custom headers attributes of the request
    value = getattr(request, key, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(key)
    return value
