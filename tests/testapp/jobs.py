"""Django Tasks (``django.tasks``, or the ``django_tasks`` backport on Django 5.2) run by AlarmTaskBackend."""

from __future__ import annotations

from typing import Any

from django.utils import timezone

try:
    from django.tasks import task
    from django.tasks.signals import task_finished, task_started
except ImportError:
    from django_tasks import task
    from django_tasks.signals import task_finished, task_started

from .models import Run


@task
def add(a: int, b: int) -> int:
    """Return the sum."""
    Run.objects.create(task="jobs.add", kwargs={"a": a, "b": b}, started_at=timezone.now())
    return a + b


@task
def explode(text: str) -> None:
    """Raise."""
    raise ValueError(text)


@task(takes_context=True)
def attempt_number(context: Any) -> int:
    """Return the attempt number the context gives."""
    return int(context.attempt)


@task(takes_context=True, backend="retrying")
def flaky(context: Any, succeed_on: int) -> int:
    """Fail until the attempt ``succeed_on``, then return the attempt number."""
    if context.attempt < succeed_on:
        raise RuntimeError(f"attempt {context.attempt} failed")
    return int(context.attempt)


@task
async def double(x: int) -> int:
    """An async task."""
    return 2 * x


def _record_signal(name: str):
    def receiver(sender: Any, task_result: Any, **kwargs: Any) -> None:
        Run.objects.create(
            task=f"signal:{name}",
            kwargs={"id": task_result.id, "status": str(task_result.status), "sender": sender.__name__},
            started_at=timezone.now(),
        )

    return receiver


task_started.connect(_record_signal("started"), weak=False, dispatch_uid="jobs.started")
task_finished.connect(_record_signal("finished"), weak=False, dispatch_uid="jobs.finished")


@task
def raise_base(kind: str) -> None:
    """End the way ``kind`` says: SystemExit, exit(1), KeyboardInterrupt."""
    if kind == "SystemExit":
        raise SystemExit("asked to exit")
    if kind == "exit":
        exit(1)  # the builtin a task might call
    raise KeyboardInterrupt


@task
def not_a_number() -> float:
    """Return what JSON cannot hold."""
    return float("nan")


@task
def echo(*args: Any) -> list[Any]:
    """Return the arguments as the task received them."""
    return list(args)


@task
def die() -> None:
    """Kill the worker process that runs this (a lost worker)."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


@task(backend="subclassed")
def add_elsewhere(a: int, b: int) -> int:
    """``add`` on the backend configured as a subclass of AlarmTaskBackend."""
    return a + b


@task
def sleep_past_the_time_limit() -> None:
    """Sleep past the runner's hard time limit in the tests' Celery settings (12 s)."""
    import time

    time.sleep(30)
