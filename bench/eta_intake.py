"""How fast a fresh Celery worker takes in tasks that wait for their ``eta``: Celery's own worker, and
one of a project that publishes ahead (``PUBLISH_AHEAD`` set: celery_scheduller adds
``prefetch.PromptPrefetch`` to its consumer).

    python bench/eta_intake.py [--tasks 3000] [--broker amqp://guest:guest@127.0.0.1:5672//] [--pool threads]

A queue is filled with ``--tasks`` tasks due in 5 minutes, then a worker (``-c 8``, as in ``compare.py``)
consumes it; printed: how many the worker holds after 1, 2, 5 and 10 s, and when it held them all. None
of the tasks runs: the worker is stopped and the queue deleted before their time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QUEUE = "csched-eta-intake"
CHECKPOINTS = (1, 2, 5, 10)


def intake(broker: str, tasks: int, publish_ahead: int, pool: str) -> tuple[list[int], float | None]:
    """Tasks the worker held at each of ``CHECKPOINTS`` seconds, and when it held all (None: not in 10 s)."""
    from kombu import Connection

    from bench.celery_app import app

    eta = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    log = Path(tempfile.gettempdir()) / "csched-eta-intake.log"
    with Connection(broker) as conn:
        channel = conn.default_channel

        def waiting() -> int:
            return int(channel.queue_declare(QUEUE, passive=True).message_count)

        for _ in range(tasks):
            app.send_task("bench.ping", args=["eta-intake"], eta=eta, queue=QUEUE, connection=conn)
        while waiting() < tasks:
            time.sleep(0.05)
        with log.open("w") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker", "-P", pool, "-c", "8",
                 "-Q", QUEUE, "-l", "warning", "--without-gossip", "--without-mingle", "--without-heartbeat",
                 "-n", f"intake-{publish_ahead}@bench"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "BENCH_BROKER": broker, "BENCH_PUBLISH_AHEAD": str(publish_ahead)},
            )  # fmt: skip
        try:
            started = time.monotonic()
            while waiting() == tasks:  # the worker's first fetch: its start-up is not the intake
                if worker.poll() is not None or time.monotonic() - started > 60:
                    raise RuntimeError(f"the worker did not start consuming; its log: {log}")
                time.sleep(0.01)
            started, held, all_in = time.monotonic(), [], None
            for checkpoint in CHECKPOINTS:
                while time.monotonic() - started < checkpoint:
                    if all_in is None and waiting() == 0:
                        all_in = time.monotonic() - started
                    time.sleep(0.02)
                held.append(tasks - waiting())
        finally:
            worker.terminate()
            worker.wait()
            channel.queue_delete(QUEUE)
    return held, all_in


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3_000)
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument("--pool", choices=["threads", "prefork"], default="threads")
    args = parser.parse_args()
    os.environ["BENCH_BROKER"] = args.broker  # before Django reads the settings
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    print(f"| worker (-P {args.pool} -c 8) | " + " | ".join(f"held after {s} s" for s in CHECKPOINTS) + " | all in |")
    print("|---|" + "---|" * (len(CHECKPOINTS) + 1))
    for label, ahead in (("Celery's own", 0), ("PUBLISH_AHEAD set (prefetch.PromptPrefetch)", 1_000)):
        held, all_in = intake(args.broker, args.tasks, ahead, args.pool)
        done = f"{all_in:.2f} s" if all_in is not None else f"not within {CHECKPOINTS[-1]} s"
        print(f"| {label} | " + " | ".join(f"{n:,}" for n in held) + f" | {done} |", flush=True)


if __name__ == "__main__":
    main()
