"""Tasks the tests schedule."""

from __future__ import annotations

import gc
import os
import time
import weakref
from typing import Any

from celery import shared_task, signals
from django.utils import timezone

from celery_scheduller import current_message
from celery_scheduller.message import to_json_value

from .models import Run


def _record(task: str, kwargs: dict[str, Any]) -> None:
    message = current_message()
    Run.objects.create(
        task=task,
        message_id=message.id if message else "",
        attempt_assigns=to_json_value(message.assigns) if message else {},
        kwargs=kwargs,
        started_at=timezone.now(),
    )


@shared_task(name="testapp.record")
def record(**kwargs: Any) -> Any:
    """Record the run and return ``kwargs["result"]``."""
    _record("record", kwargs)
    return kwargs.get("result", "done")


@shared_task(name="testapp.stale")
def stale(**kwargs: Any) -> str:
    """Like record, on the "stale" queue that only the stale-attempt test consumes."""
    _record("stale", kwargs)
    return "done"


@shared_task(name="testapp.fault", bind=True, time_limit=2)
def fault(self: Any, hang: bool = False, **kwargs: Any) -> str:
    """The fault suite's task: records each run with its task id (message id # attempt); may hang
    past its hard time limit."""
    message = current_message()
    Run.objects.create(
        task="fault",
        message_id=message.id if message else "",
        kwargs={"task_id": self.request.id, "pid": os.getpid()},
        started_at=timezone.now(),
    )
    if hang:
        time.sleep(10)
    return "done"


@shared_task(name="testapp.fail")
def fail(**kwargs: Any) -> None:
    """Record the run and raise."""
    _record("fail", kwargs)
    raise RuntimeError(kwargs.get("reason", "it failed"))


@shared_task(name="testapp.sleep")
def sleep(seconds: float = 1.0, **kwargs: Any) -> str:
    """Record the run and sleep (for timeouts)."""
    _record("sleep", {"seconds": seconds, **kwargs})
    time.sleep(seconds)
    return "slept"


@shared_task(name="testapp.noop")
def noop(**kwargs: Any) -> str:
    """Touch no database: what the worker's connections do is then the result hook's alone."""
    return "done"


@shared_task(name="testapp.tick")
def tick() -> None:
    """A periodic entry of beat_schedule."""
    _record("tick", {})


@shared_task(name="testapp.hang", time_limit=1)
def hang(**kwargs: Any) -> None:
    """Record the run and hang past the task's hard time limit."""
    _record("hang", kwargs)
    time.sleep(30)


@shared_task(name="testapp.die")
def die(**kwargs: Any) -> None:
    """Record the run and kill the pool process running it (a lost worker)."""
    import os
    import signal

    _record("die", kwargs)
    os.kill(os.getpid(), signal.SIGKILL)


# How a worker frees the requests of tasks held for their eta (tests/integration/test_prefetch.py): each
# is counted, when it is freed, as freed by reference counting or by the garbage collector's pass over
# cycles; "census" runs a full pass first, so every held request that has been dropped is counted.
_freed = {"refcount": 0, "collector": 0}
_collecting = False


def _on_gc(phase: str, _info: dict[str, Any]) -> None:
    global _collecting
    _collecting = phase == "start"


def _track(request: Any = None, **_: Any) -> None:
    if request is not None and request.eta:
        weakref.finalize(request, _count_freed)


def _count_freed() -> None:
    _freed["collector" if _collecting else "refcount"] += 1


if os.environ.get("CSCHED_TRACK_REQUESTS"):
    gc.callbacks.append(_on_gc)
    signals.task_received.connect(_track, weak=False, dispatch_uid="testapp.track_requests")


@shared_task(name="testapp.census")
def census() -> None:
    """Record how the held requests this worker process has dropped so far were freed."""
    gc.collect()
    Run.objects.create(task="census", kwargs=dict(_freed), started_at=timezone.now())


@shared_task(name="testapp.poison_text")
def poison_text(mode: str = "return", **kwargs: Any) -> str:
    """Return, or raise with, text holding a NUL character (no database stores it as text)."""
    _record("poison_text", {"mode": mode})
    if mode == "raise":
        raise ValueError("bad byte \x00 in the reply")
    return "bad byte \x00 in the result"
