"""The worker side of publishing ahead: take tasks held for their ``eta`` in as fast as they arrive, and
free each one when it has run. Both steps are added to the worker's consumer when ``PUBLISH_AHEAD`` is set
(the one case where alarms reach workers with an ``eta``) and apply to every ``eta`` task of that worker.

- ``PromptPrefetch``: a worker raises its prefetch count by one per held task but applies the new count
  only after its next poll of the broker, which can wait up to 10 s once held tasks fill the window. The
  step applies a raised count before the poll: at once when half an initial window has come in, else
  within ``SETTLE`` seconds.
- ``ReleaseTimerEntries``: Celery 5.7 keeps a held task's timer entry on its request, a reference cycle that
  only the garbage collector's full pass frees (long pauses at high rates). When the entry has fired the
  step drops it, so the task is freed when it ends.

The internals both rely on are reached through ``compat`` (logged once, and the step inactive, where a
Celery release moved them). The measurements behind them are in the docs (benchmarks, publishing ahead).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from celery import bootsteps

from . import compat

logger = logging.getLogger("celery_scheduller")

#: Seconds within which a raised prefetch count smaller than half a window is applied.
SETTLE = 0.02


class PromptPrefetch(bootsteps.StartStopStep):
    """A consumer step: apply the prefetch count raised for held ``eta`` tasks before the loop's poll."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._tick: Any = None

    def start(self, parent: Any) -> None:
        window = compat.prefetch_window(parent)
        if window is None or not parent.initial_prefetch_count:
            return  # no event loop (the solo pool, eventlet, gevent), internals moved, or prefetch disabled
        hub, qos = window
        batch = max(1, parent.initial_prefetch_count // 2)
        settling = False

        def apply() -> None:
            nonlocal settling
            settling = False
            if parent.qos is qos and qos.value != qos.prev:  # not a window of a connection since replaced
                qos.update()

        def tick() -> None:
            nonlocal settling
            raised = qos.value - (qos.prev or 0)
            if raised >= batch:
                apply()
            elif raised > 0 and not settling:
                settling = True
                hub.call_later(SETTLE, apply)

        self._tick = tick
        hub.on_tick.add(tick)

    def stop(self, parent: Any) -> None:
        if self._tick is not None and parent.hub is not None:
            parent.hub.on_tick.discard(self._tick)
        self._tick = None

    shutdown = stop


def _releasing(on_due: Callable[..., Any]) -> Callable[..., Any]:
    """``on_due`` that first drops the request's reference to the timer entry that just fired."""

    @functools.wraps(on_due)
    def release_then(request: Any, *args: Any) -> Any:
        compat.drop_timer_entry(request)
        return on_due(request, *args)

    return release_then


class ReleaseTimerEntries(bootsteps.Step):
    """A consumer step: a held task drops its fired timer entry, so it is freed when it has run."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        # Built with the consumer, before its Tasks step reads these callbacks into each task's strategy.
        for name in compat.eta_callbacks(parent):
            setattr(parent, name, _releasing(getattr(parent, name)))


def install(sender: Any = None, **_: Any) -> None:
    """``worker_init`` receiver: add ``PromptPrefetch`` and ``ReleaseTimerEntries`` to the worker's consumer
    when publishing ahead."""
    from .conf import settings

    if sender is not None and settings.publish_ahead() > 0:
        sender.app.steps["consumer"].update((PromptPrefetch, ReleaseTimerEntries))
        logger.info(
            "PUBLISH_AHEAD is set: prefetch counts raised for eta tasks apply before each poll;"
            " eta tasks drop their fired timer entries"
        )
