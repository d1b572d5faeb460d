"""A worker of a project that publishes ahead takes tasks held for their ``eta`` in as they arrive
(``prefetch.PromptPrefetch``), on RabbitMQ, where Celery's own worker takes them in a window at a time
with pauses of seconds between."""

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
            *("-P", "threads", "-c", "1", "-Q", queue, "-n", f"csched-prefetch-{publish_ahead}@%h"),
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
