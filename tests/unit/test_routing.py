"""Beat routes an alarm's task exactly as Celery's ``send_task`` would: its own router, read once."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from kombu import Queue

from celery_scheduller.sender import TaskSender


def _app(**conf: Any) -> Celery:
    app = Celery("routing", set_as_current=False, broker="memory://")
    app.conf.update(task_default_queue="default-q", **conf)

    @app.task(name="plain", shared=False)
    def plain() -> None: ...

    @app.task(name="own.queue", queue="own-q", shared=False)
    def own_queue() -> None: ...

    @app.task(name="routed.by.name", shared=False)
    def routed() -> None: ...

    return app


def _route_router(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any) -> Any:
    return {"queue": "by-function"} if kwargs.get("urgent") else None


@pytest.mark.parametrize(
    "conf",
    [
        {},
        {"task_routes": {"routed.*": {"queue": "routed-q", "routing_key": "rk"}}},
        {"task_routes": (_route_router,)},
        {"task_queues": [Queue("default-q"), Queue("own-q")], "task_create_missing_queues": True},
    ],
)
@pytest.mark.parametrize("name", ["plain", "own.queue", "routed.by.name"])
@pytest.mark.parametrize("kwargs", [{}, {"urgent": True}])
def test_the_route_is_the_one_celery_picks(conf: dict[str, Any], name: str, kwargs: dict[str, Any]) -> None:
    app = _app(**conf)
    sender = TaskSender(app)
    task = app.tasks[name]

    def options() -> dict[str, Any]:
        return dict(sender._task_options(name), headers={"h": "1"})

    ours = sender._route(options(), name, kwargs, task)
    celerys = app.amqp.router.route(options(), name, (), kwargs, task)
    assert _described(ours) == _described(celerys)
    # the second call, with the default queue remembered, still agrees
    assert _described(sender._route(options(), name, kwargs, task)) == _described(celerys)


def _described(options: dict[str, Any]) -> dict[str, Any]:
    queue = options.get("queue")
    return {**options, "queue": getattr(queue, "name", queue)}
