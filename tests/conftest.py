"""Shared fixtures: a real Celery worker subprocess and an in-process beat scheduler."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import tests.celery_app  # noqa: F401  (the project app is current, as in a Django project)

ROOT = Path(__file__).resolve().parent.parent

# The test process writes its activity counts only when a beat closes or a test flushes them: a thread of its
# own writing to the test database could hold a connection while the database is dropped.
import celery_scheduller.activity  # noqa: E402

celery_scheduller.activity.default.interval = 365 * 24 * 3600


def wait_for(condition: Callable[[], object], timeout: float, what: str, step: float = 0.05) -> object:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def start_worker(log: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``celery worker`` (prefork) on the test database and the session's broker (``env`` over the
    environment); wait until ready."""
    from django.db import connection

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "CSCHED_DB_NAME": str(connection.settings_dict["NAME"]),
        "CSCHED_LOG": "INFO",
        "CSCHED_WORKER_TASKS": "1",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    options = ["-P", "prefork", "-l", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    return start_celery(log, ["worker", *options, *argv], env, "ready.")


def start_celery(log: Path, argv: list[str], env: dict[str, str], ready: str) -> subprocess.Popen[bytes]:
    """Start ``celery -A tests.celery_app <argv>`` with ``env``, its output in ``log``; wait until the log
    says ``ready``."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.celery_app", *argv],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while ready not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"celery {argv[0]} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


def purge_broker(app: object) -> None:
    """Drop messages an earlier run left in the broker; they would run against this one."""
    import contextlib

    from django.conf import settings

    with app.connection_for_write() as conn:  # type: ignore[attr-defined]
        if conn.transport_cls == "redis" or conn.transport.driver_type == "redis":
            client = conn.default_channel.client
            for key in client.scan_iter():  # the database is this run's (.ci/redis_db.py): all but its claim
                if key != b"celery_scheduller:run-claim":
                    client.delete(key)
            return
        for queue in (settings.CSCHED_TEST_QUEUE, settings.CSCHED_STALE_QUEUE):
            with contextlib.suppress(Exception):  # a queue nobody declared yet holds nothing
                conn.default_channel.queue_purge(queue)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a subprocess: TERM, then KILL after 20 s."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


#: The session's worker while it runs: a test that only ticks beat still publishes to it.
_session_worker: list[subprocess.Popen[bytes]] = []


@pytest.fixture(scope="session")
def worker(
    django_db_setup: None, django_db_blocker: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """A real ``celery worker`` (prefork, 3 processes) on the default queue."""
    from tests.celery_app import app

    purge_broker(app)
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    from django.conf import settings

    queue = settings.CSCHED_TEST_QUEUE
    proc = start_worker(log, "-c", "3", "-Q", queue, "-n", f"csched-test-{os.getpid()}@%h")
    _session_worker.append(proc)
    try:
        yield
    finally:
        _session_worker.clear()
        stop(proc)
        if os.environ.get("CSCHED_SHOW_WORKER_LOG"):
            print(log.read_text()[-20000:])


@pytest.fixture
def beat(tmp_path: Path) -> Callable[..., object]:
    """Build in-process ``AlarmScheduler`` instances (beats) on the test app."""
    from celery_scheduller.schedulers import AlarmScheduler
    from tests.celery_app import app

    made: list[AlarmScheduler] = []

    def make(**kwargs: object) -> AlarmScheduler:
        scheduler = AlarmScheduler(app=app, schedule_filename=str(tmp_path / f"beat-{len(made)}"), **kwargs)
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.close()


def on_schedule(*message_ids: str) -> bool:
    """True while any of these alarms is pending or published (ended ones may be kept as history)."""
    from celery_scheduller import states
    from celery_scheduller.models import Alarm

    return Alarm.objects.filter(message_id__in=message_ids, state__in=states.ACTIVE).exists()


def run_beat(scheduler: object, until: Callable[[], object], timeout: float, what: str) -> object:
    """Tick ``scheduler``'s alarm side (sleeping as it asks, at most 50 ms) until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        delay = scheduler.tick_alarms(time.time())  # type: ignore[attr-defined]
        result = until()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(min(max(delay, 0.005), 0.05))


@pytest.fixture(autouse=True)
def _worker_idle_at_teardown(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used the worker, wait until it runs nothing: a task's response written while
    the test's tables are being flushed deadlocks the flush."""
    yield
    published = "beat" in request.fixturenames and _session_worker  # the session worker runs what it sent
    if "worker" not in request.fixturenames and not published:
        return
    worker_idle(10)


def worker_idle(timeout: float) -> None:
    """Wait until the workers run and hold no task and their response writers stored the last response: what the
    workers were given has been answered (or ignored). The event a test waits on to see that something
    did not happen, instead of a fixed sleep."""
    from tests.celery_app import app

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inspect = app.control.inspect(timeout=0.5)
        running = inspect.active() or {}
        held = inspect.scheduled() or {}  # tasks held for their eta (published ahead)
        if not any(running.values()) and not any(held.values()):
            # the response writer stores the last task's response up to RESPONSE_BATCH_WAIT after it ran
            from celery_scheduller.conf import settings

            time.sleep(settings.response_batch_wait() / 1000 + 0.1)
            return
        time.sleep(0.1)
    pytest.fail(f"the workers still ran tasks after {timeout}s")


@pytest.fixture
def close_sync_thread_connections() -> Iterator[None]:
    """``sync_to_async`` (the async API, ``aget_result``) runs calls in a thread with its own database
    connection: closed after the test, or the test database cannot be dropped."""
    yield
    import asyncio

    from asgiref.sync import sync_to_async
    from django.db import connections

    asyncio.run(sync_to_async(connections.close_all)())
