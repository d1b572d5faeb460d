"""The one task every system under test runs: it records when it started, nothing else."""

from __future__ import annotations

import time
from typing import Any

import redis
from celery import shared_task
from django.conf import settings

from celery_scheduller.wire import HEADER, read_header

_hits = redis.Redis.from_url(settings.HITS_URL)


def _published_at(request: Any) -> str:
    """When celery_scheduller's beat claimed this attempt for publishing (its header), else "-"."""
    raw = (getattr(request, "headers", None) or {}).get("celery_scheduller") or getattr(
        request, "celery_scheduller", None
    )
    if not raw:
        return "-"
    found = read_header({HEADER: raw}, None)  # the signed header, read as the worker's hook reads it
    published = found[0].published_at if found else None
    return repr(published.timestamp()) if published else "-"


@shared_task(name="bench.hit", bind=True)
def hit(self: Any, run: str, n: int, due: float) -> None:
    """Record ``n due started published task-id worker`` for the run; lateness is started − due. The task
    id (``<message id>#<attempt>`` for celery_scheduller) tells a redelivered message from a new attempt."""
    started = time.time()
    request = self.request
    _hits.rpush(f"hits:{run}", f"{n} {due!r} {started!r} {_published_at(request)} {request.id} {request.hostname}")


@shared_task(name="bench.ping")
def ping(key: str) -> None:
    """Tell the benchmark the worker consumes."""
    _hits.set(key, "1")


@shared_task(name="bench.soak", bind=True)
def soak(self: Any, run: str, n: int, due: float, fail: bool) -> None:
    """bench/soak.py's task: records ``n due started attempt outcome``; a ``fail`` alarm's first try raises."""
    started = time.time()
    attempt = int(str(self.request.id).rpartition("#")[2].partition(".")[0] or 0)  # message id#attempt.pk
    failing = fail and attempt == 1
    _hits.rpush(f"soak:{run}", f"{n} {due!r} {started!r} {attempt} {'error' if failing else 'ok'}")
    if failing:
        raise RuntimeError("a first try that fails (bench/soak.py)")
