"""The one task every system under test runs: it records when it started, nothing else."""

from __future__ import annotations

import time

import redis
from celery import shared_task
from django.conf import settings

_hits = redis.Redis.from_url(settings.HITS_URL)


@shared_task(name="bench.hit")
def hit(run: str, n: int, due: float) -> None:
    """Record ``n due started`` for the run; lateness is started − due."""
    _hits.rpush(f"hits:{run}", f"{n} {due!r} {time.time()!r}")


@shared_task(name="bench.ping")
def ping(key: str) -> None:
    """Tell the benchmark the worker consumes."""
    _hits.set(key, "1")
