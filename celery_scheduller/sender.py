"""Publishing an alarm's attempt: Celery's ``send_task``, with the configuration read once per beat."""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import Any

from celery import Celery

from . import compat
from .message import Message
from .wire import PRIORITY_KEY, QUEUE_KEY, AttemptRef, header_limit, task_id_of


def delivery_options(message: Message) -> dict[str, Any] | None:
    """The queue and priority an alarm asked for in its assigns, as Celery publish options."""
    if QUEUE_KEY not in message.assigns and PRIORITY_KEY not in message.assigns:
        return None
    options: dict[str, Any] = {}
    if isinstance(message.assigns.get(QUEUE_KEY), str):
        options["queue"] = message.assigns[QUEUE_KEY]
    if isinstance(message.assigns.get(PRIORITY_KEY), int):
        options["priority"] = message.assigns[PRIORITY_KEY]
    return options


def _short_repr(value: object, limit: int = 1024) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _merged(into: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Celery's ``lpmerge``: ``options`` over ``into``, except where an option is None."""
    into.update((key, value) for key, value in options.items() if value is not None)
    return into


class TaskSender:
    """``app.send_task`` for beat's loop: the same message, routing, task options and publish
    signals, with the configuration read once instead of on every call (several times per alarm,
    each a walk through Django's settings when the app reads its config from them).

    Beat's engine publishes only through ``open``, ``header_limit``, ``batch`` and ``send_attempt``: a
    test gives it a recording sender instead."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._options: dict[str, dict[str, Any]] = {}
        self._sent_event: bool | None = None
        self._declared_on: Any = None
        self._declared: set[object] = set()
        self._default_queue: str | None = None

    def open(self, producer: Any) -> Any:
        """A context giving ``producer``, or one acquired from the app's pool when it is None."""
        return self.app.producer_or_acquire(producer)

    def header_limit(self, producer: Any) -> int | None:
        """The most bytes a message header may carry on ``producer``'s broker (None: no such limit)."""
        return header_limit(producer.connection)

    def batch(self, producer: Any, size: int) -> Any:
        """``producer.batch()`` (kombu 5.7+: one Redis pipeline for the batch), else publish one by one."""
        batch = getattr(producer, "batch", None)
        return batch(max_size=max(1, size)) if batch is not None else contextlib.nullcontext()

    def send_attempt(
        self, producer: Any, ref: AttemptRef, message: Message, eta: dt.datetime | None, headers: dict[str, str]
    ) -> None:
        """Publish ``message`` as the attempt ``ref``: its task id, header, deadline as expiry, queue and
        priority from its assigns, ``eta`` when published ahead of its time."""
        self.send(
            producer,
            message.service_name,
            message.raw_request,
            task_id_of(message.id, ref.attempt, ref.pk),
            headers,
            ref.deadline,
            eta,
            delivery_options(message),
        )

    def send(
        self,
        producer: Any,
        name: str,
        kwargs: dict[str, Any],
        task_id: str,
        headers: dict[str, str],
        expires: dt.datetime,
        eta: dt.datetime | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        amqp = self.app.amqp
        if self._sent_event is None:
            self._sent_event = bool(self.app.conf.task_send_sent_event)
        options = dict(self._task_options(name), headers=headers, **(overrides or {}))
        time_limit = options.pop("time_limit", None)
        soft_time_limit = options.pop("soft_time_limit", None)
        ignore_result = options.pop("ignore_result", None)
        options.pop("expires", None)
        # as send_task does, the registered task instance (the stubs say class) goes to custom routers
        task: Any = self.app.tasks.get(name)
        options = self._route(options, name, kwargs, task)
        options["expiration"] = max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds())
        message = amqp.create_task_message(
            task_id,
            name,
            (),
            kwargs,
            expires=expires,
            eta=eta,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            create_sent_event=self._sent_event,
            ignore_result=ignore_result,
            # Celery's default is a size-limited repr of the arguments: costly at thousands per second
            argsrepr="()",
            kwargsrepr=_short_repr(kwargs),
            **options,
        )
        # Declaring the queue once per connection is enough; kombu would re-bind it on every publish.
        if producer is not self._declared_on:  # a new connection: declare again
            self._declared_on, self._declared = producer, set()
        queue = options.get("queue")
        queue_name = getattr(queue, "name", queue)
        if queue_name in self._declared:
            options["declare"] = []
        with compat.library_errors(producer.connection):
            amqp.send_task_message(producer, name, message, retry=False, **options)
        self._declared.add(queue_name)

    def _route(self, options: dict[str, Any], name: str, kwargs: dict[str, Any], task: Any) -> dict[str, Any]:
        """``Router.route`` with the default queue read once: it reads it from the config per message."""
        router: Any = self.app.amqp.router
        options = router.expand_destination(options)
        if router.routes:
            route = router.lookup_route(name, (), kwargs, options, task)
            if route:
                return _merged(router.expand_destination(route), options)
        if "queue" not in options:
            if self._default_queue is None:
                self._default_queue = self.app.conf.task_default_queue
            options = _merged(router.expand_destination(self._default_queue), options)
        return options

    def _task_options(self, name: str) -> dict[str, Any]:
        """The registered task's own options (queue, priority, time limits…), as send_task applies them."""
        found = self._options.get(name)
        if found is None:
            task = self.app.tasks.get(name)
            found = compat.task_exec_options(task)
            self._options[name] = found
        return found
