"""The trace tests' OpenTelemetry set-up: the SDK in a process, its spans written as JSON lines to a file that
the test reads (one file for every process: lines are appended whole)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any


def export_to_file(path: str, celery: bool = False) -> None:
    """Configure the SDK in this process: each ended span is appended to ``path``; with ``celery``, also
    opentelemetry-instrumentation-celery's spans."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class FileExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            with open(path, "a") as out:
                for span in spans:
                    out.write(json.dumps(as_dict(span)) + "\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider(resource=Resource.create({"service.name": f"csched-test-{os.getpid()}"}))
    provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
    trace.set_tracer_provider(provider)
    if celery:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument()


def as_dict(span: Any) -> dict[str, Any]:
    """What the tests read of a span: names, ids (hex), parent, links, attributes, pid."""
    context = span.get_span_context()
    return {
        "name": span.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": None if span.parent is None else f"{span.parent.span_id:016x}",
        "links": [f"{link.context.trace_id:032x}/{link.context.span_id:016x}" for link in span.links],
        "attributes": {key: value for key, value in (span.attributes or {}).items()},
        "pid": os.getpid(),
    }
