"""Traces across processes: a request span in this process dispatches; a real beat publishes in a span under it;
a real worker runs the task (with opentelemetry-instrumentation-celery too) in spans of the same trace, linked
to the request; after a retry as well. Every process exports its spans with the OpenTelemetry SDK."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from celery_scheduller import Message, states, tracing
from celery_scheduller.message import from_json_value
from celery_scheduller.models import Alarm
from tests.conftest import wait_for
from tests.ops import start_beat, start_worker, stop_all, subprocess_env
from tests.testapp.alarms import TestAlarms

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.operations]


@pytest.fixture(scope="module")
def exporter() -> Any:
    """This process's spans, in the SDK's in-memory exporter (the tracer provider is set once per process)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return memory


def _spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_request_span_reaches_the_task_span_through_beat_and_a_retry(tmp_path: Path, exporter: Any) -> None:
    from django.conf import settings
    from opentelemetry import trace

    spans_file = tmp_path / "spans.jsonl"
    queue = f"{settings.CSCHED_TEST_QUEUE}.traces"
    env = subprocess_env(queue, CSCHED_OTEL_FILE=str(spans_file))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(start_beat(tmp_path / "beat.log", env))
        worker_env = {**env, "CSCHED_OTEL_CELERY": "1"}
        procs.append(start_worker(tmp_path / "worker.log", worker_env, "prefork", 2, "traces"))

        tracer = trace.get_tracer("tests")
        with tracer.start_as_current_span("POST /orders") as request:
            alarms = TestAlarms()
            alarms.dispatch(Message.new("testapp.record", id="traced"), "order-1", in_ms=1500)
            retried = Message.new("testapp.record", id="traced-retry", assigns={"retries_left": 1, "retry_ms": 300})
            alarms.dispatch(retried, "order-1", in_ms=1500)
        origin = request.get_span_context()
        trace_id, request_id = f"{origin.trace_id:032x}", f"{origin.span_id:016x}"
        assert [span.name for span in exporter.get_finished_spans()][-1] == "POST /orders"

        # the context is stored with the alarm (minutes or months before it is due)
        stored = from_json_value(Alarm.objects.get(message_id="traced").assigns)[tracing.TRACE_KEY]
        assert stored["traceparent"].split("-")[1:3] == [trace_id, request_id]

        both = Alarm.objects.filter(message_id__in=["traced", "traced-retry"])
        wait_for(lambda: not both.filter(state__in=states.ACTIVE).exists(), 30, "both alarms to end")

        def ours(message_id: str, prefix: str) -> list[dict[str, Any]]:
            return [
                span
                for span in _spans(spans_file)
                if span["name"].startswith(prefix)
                and span["attributes"].get("celery_scheduller.message_id") == message_id
            ]

        wait_for(lambda: len(ours("traced-retry", "celery_scheduller.service_responded")) == 2, 15, "every span")
        spans = _spans(spans_file)
        for message_id, attempts in (("traced", 1), ("traced-retry", 2)):
            publishes = sorted(
                ours(message_id, "celery_scheduller.publish"),
                key=lambda s: s["attributes"]["celery_scheduller.attempt"],
            )
            runs = sorted(
                ours(message_id, "celery_scheduller.run"), key=lambda s: s["attributes"]["celery_scheduller.attempt"]
            )
            responded = ours(message_id, "celery_scheduller.service_responded")
            assert [s["attributes"]["celery_scheduller.attempt"] for s in publishes] == list(range(1, attempts + 1))
            assert len(runs) == attempts and len(responded) == attempts
            beat_pid, worker_pids = procs[0].pid, {span["pid"] for span in runs}
            for publish, run in zip(publishes, runs, strict=True):
                # beat (another process) publishes under the request; the worker runs under beat's publish span,
                # linked to the request
                assert publish["pid"] == beat_pid and publish["trace_id"] == trace_id
                assert publish["parent_id"] == request_id
                assert run["trace_id"] == trace_id and run["parent_id"] == publish["span_id"]
                assert f"{trace_id}/{request_id}" in run["links"]
                assert run["name"] == "celery_scheduller.run testapp.record"
                assert run["attributes"]["celery_scheduller.scheduller"] == "tests"
            assert beat_pid not in worker_pids
            # opentelemetry-instrumentation-celery's own span of the task is in the same trace, under beat's publish
            celery_runs = [
                s
                for s in spans
                if s["name"] == "run/testapp.record" and s["parent_id"] in {p["span_id"] for p in publishes}
            ]
            assert len(celery_runs) == attempts and {s["trace_id"] for s in celery_runs} == {trace_id}
            # service_responded runs in the task's span, attempt by attempt
            assert {s["trace_id"] for s in responded} == {trace_id}
            assert {s["parent_id"] for s in responded} == {run["span_id"] for run in runs}
    finally:
        stop_all(procs)


def test_without_a_span_nothing_is_stored() -> None:
    TestAlarms().dispatch(Message.new("testapp.record", id="untraced"), "order-2", in_ms=60_000)
    assert tracing.TRACE_KEY not in from_json_value(Alarm.objects.get(message_id="untraced").assigns)
