"""A real Prometheus scrapes two real beats and two real workers (prefork with PROMETHEUS_MULTIPROC_DIR, and
threads) during a run of a few hundred alarms; PromQL over what it scraped matches what the run did."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from celery_scheduller import Message, metrics, states
from celery_scheduller.message import from_json_value
from celery_scheduller.models import Alarm
from tests.conftest import ROOT, wait_for
from tests.ops import Prometheus, free_port, start_beat, start_worker, stop_all, subprocess_env
from tests.testapp.alarms import BrokenAlarms, TestAlarms
from tests.testapp.models import Run

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.operations]

DEPLOY = ROOT / "docs" / "deploy"
OK_ALARMS, RETRIED, FAILED, CANCELLED, ORPHANS = 200, 30, 10, 5, 5


def _scheduled(alarms: TestAlarms) -> None:
    now = timezone.now()
    batch = []
    for i in range(OK_ALARMS):
        message = Message.new("testapp.record", {"i": i}, id=f"m-ok-{i}")
        batch.append((message, "ok", now + dt.timedelta(seconds=2 + i / 50)))
    for i in range(RETRIED):
        message = Message.new("testapp.record", id=f"m-retry-{i}", assigns={"retries_left": 1, "retry_ms": 200})
        batch.append((message, "retry", now + dt.timedelta(seconds=2 + i / 10)))
    for i in range(FAILED):
        message = Message.new("testapp.fail", id=f"m-fail-{i}", assigns={"fail_reason": "given up"})
        batch.append((message, "fail", now + dt.timedelta(seconds=3 + i / 10)))
    for i in range(CANCELLED):
        batch.append((Message.new("testapp.record", id=f"m-cancel-{i}"), "cancel", now + dt.timedelta(hours=1)))
    alarms.dispatch_many(batch)
    # service_responded fails three times, then says OK: the callback failures counter's
    BrokenAlarms().dispatch(Message.new("testapp.record", id="m-broken"), "broken", in_ms=2000)
    for i in range(CANCELLED):
        assert alarms.cancel(f"m-cancel-{i}")
    # alarms of a Scheduller nobody serves any more, due two minutes ago: the backlog gauge's
    for i in range(ORPHANS):
        Alarm.objects.create(
            message_id=f"m-orphan-{i}",
            scheduller="orphans",
            task_name="testapp.record",
            aggregate_id="orphan",
            dispatch_at=now - dt.timedelta(minutes=2),
        )


def _true_lateness() -> list[float]:
    """Start minus due of every run, as the tasks recorded it."""
    found = []
    for run in Run.objects.filter(message_id__startswith="m-"):
        due = from_json_value(run.attempt_assigns)["dispatch_at"]
        found.append((run.started_at - due).total_seconds())
    return sorted(found)


def _bucket_of(seconds: float) -> tuple[float, float]:
    low = 0.0
    for bound in metrics.LATENESS_BUCKETS:
        if seconds <= bound:
            return low, bound
        low = bound
    return low, float("inf")


def test_prometheus_scrapes_beats_and_workers_and_promql_matches_the_run(tmp_path: Path) -> None:
    from django.conf import settings

    queue = f"{settings.CSCHED_TEST_QUEUE}.metrics"
    beat_ports, worker_ports, web_port = [free_port(), free_port()], [free_port(), free_port()], free_port()
    multiproc = tmp_path / "prom-multiproc"
    multiproc.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    prometheus = None
    try:
        for index, port in enumerate(beat_ports):
            env = subprocess_env(queue, CSCHED_METRICS_PORT=str(port), CSCHED_ACTIVITY_INTERVAL="1000")
            procs.append(start_beat(tmp_path / f"beat{index}.log", env))
        prefork = subprocess_env(
            queue,
            CSCHED_WORKER_METRICS_PORT=str(worker_ports[0]),
            PROMETHEUS_MULTIPROC_DIR=str(multiproc),
            CSCHED_ACTIVITY_INTERVAL="1000",
        )
        procs.append(start_worker(tmp_path / "prefork.log", prefork, "prefork", 2, "metrics-prefork"))
        threads = subprocess_env(
            queue, CSCHED_WORKER_METRICS_PORT=str(worker_ports[1]), CSCHED_ACTIVITY_INTERVAL="1000"
        )
        procs.append(start_worker(tmp_path / "threads.log", threads, "threads", 4, "metrics-threads"))
        # this process stands for the web process: it cancels, and serves its own counters
        assert metrics.serve(web_port, "web")
        targets = {"beat": beat_ports, "worker": worker_ports, "web": [web_port]}
        prometheus = Prometheus(tmp_path, targets, rules=DEPLOY / "prometheus-alerts.yml")
        wait_for(lambda: prometheus.value("sum(up)") == 5.0, 30, "Prometheus to scrape all five targets")

        import prometheus_client

        sample = prometheus_client.REGISTRY.get_sample_value
        cancelled_before = sample("celery_scheduller_cancelled_total", {"scheduller": "tests"}) or 0.0
        _scheduled(TestAlarms())
        ours = Alarm.objects.exclude(scheduller="orphans").exclude(message_id__startswith="m-cancel")
        wait_for(lambda: not ours.filter(state__in=states.ACTIVE).exists(), 60, "every alarm to end")
        assert ours.filter(state=states.FINISHED).count() == OK_ALARMS + RETRIED + 1
        assert ours.filter(state=states.FAILED).count() == FAILED

        published = OK_ALARMS + 2 * RETRIED + FAILED + 1
        final = {
            "published_total": published,
            "finished_total": OK_ALARMS + RETRIED + 1,
            "start_lateness_seconds_count": published,
        }

        def scraped() -> dict[str, float | None]:
            return {name: prometheus.value(f"sum(celery_scheduller_{name}{{job!='web'}})") for name in final}

        deadline = time.monotonic() + 30  # a scrape every second
        while scraped() != final and time.monotonic() < deadline:
            time.sleep(0.5)
        assert scraped() == final
        by_task = prometheus.by("sum by (task) (celery_scheduller_published_total{job!='web'})", "task")
        assert by_task == {"testapp.record": OK_ALARMS + 2 * RETRIED + 1, "testapp.fail": FAILED}
        outcomes = prometheus.by("sum by (outcome) (celery_scheduller_answered_total{job!='web'})", "outcome")
        assert outcomes == {"ok": OK_ALARMS + 2 * RETRIED + 1, "error": FAILED}
        assert prometheus.value("sum(celery_scheduller_retried_total{job!='web'})") == RETRIED
        assert prometheus.value("sum(celery_scheduller_failed_total{job!='web'})") == FAILED
        cancelled = prometheus.value('sum(celery_scheduller_cancelled_total{job="web",scheduller="tests"})')
        assert cancelled == cancelled_before + CANCELLED
        assert prometheus.value("sum(celery_scheduller_task_run_seconds_count{job!='web'})") == published
        # every answer's service_responded ran once, the broken alarm's three more times (decided again)
        responded = prometheus.value("sum(celery_scheduller_service_responded_seconds_count{job!='web'})")
        assert responded == published + 3
        failures = prometheus.by(
            "sum by (scheduller) (celery_scheduller_callback_failures_total{job!='web'})", "scheduller"
        )
        assert failures == {"broken": 3}
        # both workers ran alarms, and the prefork worker's pool processes add up in its one scrape
        runs = "sum by (instance) (celery_scheduller_task_run_seconds_count{job='worker'})"
        per_worker = prometheus.by(runs, "instance")
        assert set(per_worker) == {f"127.0.0.1:{port}" for port in worker_ports}
        assert all(count > 0 for count in per_worker.values()) and sum(per_worker.values()) == published
        # both beats claimed; their claims took every publish
        assert prometheus.value("sum(celery_scheduller_claim_batch_size_sum{job!='web'})") == published
        ticks = prometheus.by('celery_scheduller_beat_last_tick_timestamp_seconds{job="beat"}', "instance")
        assert set(ticks) == {f"127.0.0.1:{port}" for port in beat_ports}
        assert all(abs(time.time() - at) < 30 for at in ticks.values())
        assert prometheus.query('celery_scheduller_beat_last_tick_timestamp_seconds{job="worker"}') == []

        # the lateness histogram's quantiles fall in the buckets of the quantiles the tasks measured
        lateness = _true_lateness()
        assert len(lateness) == published
        for q in (0.5, 0.99):
            estimate = prometheus.value(
                f"histogram_quantile({q}, sum by (le) (celery_scheduller_start_lateness_seconds_bucket{{job!='web'}}))"
            )
            true = lateness[min(len(lateness) - 1, int(q * len(lateness)))]
            low, high = _bucket_of(true)
            assert estimate is not None and low - 0.005 <= estimate <= high + 0.005, (q, estimate, true)

        # the backlog gauge: the orphans, and their age; nothing of the served Scheduller is due unpublished
        # (the table gauges are read at most every GAUGE_CACHE seconds: they settle within it and a scrape)
        backlog = 'max by (scheduller) (celery_scheduller_backlog{job="beat"})'
        wait_for(
            lambda: _only_orphans(prometheus.by(backlog, "scheduller")),
            metrics.GAUGE_CACHE + 10,
            "the backlog gauge to read the orphans alone",
        )
        age = prometheus.value('max(celery_scheduller_backlog_oldest_age_seconds{scheduller="orphans"})')
        assert age is not None and age >= 120
        assert prometheus.value('max(celery_scheduller_failed{scheduller="tests"})') == FAILED
        in_flight = 'max(celery_scheduller_in_flight{scheduller="tests"})'
        wait_for(lambda: prometheus.value(in_flight) == 0, metrics.GAUGE_CACHE + 10, "in flight to read 0")

        # the alert rules load in this server and evaluate over what it scraped; the Grafana dashboard names only
        # metrics it scraped
        def rules_evaluated() -> list[dict[str, Any]] | None:
            groups = prometheus.get("/api/v1/rules")["data"]["groups"]
            found = [rule for group in groups for rule in group["rules"]]
            return found if found and all(rule["health"] == "ok" for rule in found) else None

        evaluated = wait_for(rules_evaluated, 15, "the alert rules to be evaluated")
        assert len(evaluated) == 6  # type: ignore[arg-type]
        # the orphans are more than two minutes past due: the backlog alert is pending (its `for:` not yet over)
        states_by_alert = {rule["name"]: rule["state"] for rule in evaluated}  # type: ignore[union-attr]
        assert states_by_alert["CelerySchedullerBacklog"] == "pending"
        assert states_by_alert["CelerySchedullerNoBeat"] == "inactive"
        rules = str(DEPLOY / "prometheus-alerts.yml")
        check = subprocess.run(["promtool", "check", "rules", rules], capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr
        # the Compose example's Prometheus configuration loads, with its rule file where the example mounts it
        config = tmp_path / "compose-prometheus.yml"
        example = (DEPLOY / "prometheus.yml").read_text()
        config.write_text(example.replace("/etc/prometheus/prometheus-alerts.yml", rules))
        check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr
        scraped = set(prometheus.get("/api/v1/label/__name__/values")["data"])
        assert _grafana_metric_names() <= scraped, _grafana_metric_names() - scraped
        assert _alert_metric_names() <= scraped, _alert_metric_names() - scraped
    finally:
        if prometheus is not None:
            prometheus.close()
        stop_all(procs)


def _only_orphans(backlog: dict[str, float]) -> bool:
    """The orphans are the backlog, every served Scheduller's is 0."""
    served = {"tests", "broken"} <= set(backlog)
    return served and backlog.get("orphans") == ORPHANS and sum(backlog.values()) == ORPHANS


def _names_in(expression: str) -> set[str]:
    import re

    return set(re.findall(r"\b(celery_scheduller_[a-z_]+)\b", expression))


def _grafana_metric_names() -> set[str]:
    board = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    names: set[str] = set()
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            names |= _names_in(target["expr"])
    assert names, "the dashboard queries no metric"
    return names


def _alert_metric_names() -> set[str]:
    return _names_in((DEPLOY / "prometheus-alerts.yml").read_text())
