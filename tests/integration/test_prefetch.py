"""A worker of a project that publishes ahead takes tasks held for their ``eta`` in as they arrive
(``prefetch.PromptPrefetch``), on RabbitMQ, where Celery's own worker takes them in a window at a time
with pauses of seconds between; and frees each when it has run (``prefetch.GuardHeldAlarms``), where
Celery's own worker leaves it to the garbage collector's full pass."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import pytest
from kombu import Connection

from tests.conftest import start_worker, wait_for

RABBITMQ = os.environ.get("CSCHED_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")
TASKS = 400
HELD = 50


def _waiting(conn: Connection, queue: str) -> int:
    """Messages of ``queue`` not yet sent to a consumer."""
    return conn.default_channel.queue_declare(queue, passive=True).message_count


@pytest.mark.parametrize(("publish_ahead", "takes_all"), [(1_000, True), (0, False)], ids=["ahead", "celery"])
def test_a_worker_takes_in_tasks_held_for_their_eta_as_fast_as_they_arrive(
    tmp_path: Path, publish_ahead: int, takes_all: bool
) -> None:
    from tests.celery_app import app

    queue = f"csched-prefetch-{os.getpid()}-{publish_ahead}"
    eta = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)  # none of them runs during the test
    with Connection(RABBITMQ) as conn:
        for n in range(TASKS):
            app.send_task("testapp.record", kwargs={"n": n}, eta=eta, queue=queue, connection=conn)
        wait_for(lambda: _waiting(conn, queue) == TASKS, 10, f"the {TASKS} tasks in the queue")
        # one thread: an initial prefetch window of 4 (1 × the prefetch multiplier)
        worker = start_worker(
            tmp_path / "worker.log",
            *("-P", "threads", "-c", "1", "-Q", queue, "-n", f"csched-prefetch-{os.getpid()}-{publish_ahead}@%h"),
            env={"CSCHED_BROKER": RABBITMQ, "CSCHED_PUBLISH_AHEAD": str(publish_ahead)},
        )
        try:
            started = time.monotonic()
            while _waiting(conn, queue) and time.monotonic() - started < 5:
                time.sleep(0.1)
            left, took = _waiting(conn, queue), time.monotonic() - started
        finally:
            worker.kill()  # one process holding nothing but unacknowledged messages, which the broker requeues
            worker.wait()
            conn.default_channel.queue_delete(queue)

    if takes_all:
        assert left == 0, f"the worker publishing ahead left {left} of {TASKS} tasks in the broker after {took:.1f} s"
    else:
        # Celery's worker alone: the window, then about one more window per timer wait. If this fails, Celery
        # applies raised prefetch counts promptly itself and prefetch.PromptPrefetch can go.
        assert left > TASKS // 2, f"Celery's own worker took in {TASKS - left} of {TASKS} tasks within {took:.1f} s"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("publish_ahead", [1_000, 0], ids=["ahead", "celery"])
def test_a_task_held_for_its_eta_is_freed_when_it_has_run_not_by_the_garbage_collector(
    tmp_path: Path, publish_ahead: int
) -> None:
    from celery.worker.request import Request

    from tests.celery_app import app
    from tests.testapp.models import Run

    queue = f"csched-freed-{os.getpid()}-{publish_ahead}"
    # a prefetch window that holds them all: Celery's own worker takes them in at once on RabbitMQ too
    worker = start_worker(
        tmp_path / "worker.log",
        *("-P", "threads", "-c", "1", "--prefetch-multiplier", str(2 * HELD)),
        *("-Q", queue, "-n", f"csched-freed-{os.getpid()}-{publish_ahead}@%h"),
        env={
            "CSCHED_PUBLISH_AHEAD": str(publish_ahead),
            "CSCHED_TRACK_REQUESTS": "1",
            **({} if publish_ahead else {"CSCHED_STOCK_CONSUMER": "1"}),
        },
    )
    try:
        eta = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
        for n in range(HELD):
            app.send_task("testapp.record", kwargs={"n": n}, eta=eta, queue=queue)
        wait_for(lambda: Run.objects.filter(task="record").count() == HELD, 30, f"the {HELD} held tasks run")
        app.send_task("testapp.census", queue=queue)
        census = wait_for(lambda: Run.objects.filter(task="census").first(), 30, "the census").kwargs  # type: ignore[attr-defined]
    finally:
        worker.terminate()
        worker.wait()

    if publish_ahead:
        # The last request can still be referenced by the worker when the census runs.
        assert census["collector"] == 0 and census["refcount"] >= HELD - 1, census
    elif hasattr(Request, "_eta_timer_entry"):
        # Celery's own worker (5.7 on): every held request in a cycle with its timer entry. If this fails,
        # Celery no longer makes the cycle and prefetch.GuardHeldAlarms need not drop the entries.
        assert census["collector"] >= HELD - 1 and census["refcount"] <= 1, census
    else:
        assert census["collector"] == 0, census  # Celery 5.5 keeps no timer entry on the request
