"""What one Celery worker pays per task for alarm deliveries, against the same task sent plainly.

    python bench/worker_cost.py [--tasks 8000] [--seconds 12] [--repeat 3] [--connections pool]

A queue is filled first (plain ``send_task``, or celery_scheduller's beat publishing due alarms with no
in-flight cap, then stopped), then a fresh worker (``-P threads -c 8``, as in ``compare.py``) drains it
alone while its CPU time and the tasks it ran are counted over ``--seconds``. Variants:

- ``plain``: ``bench.hit`` sent with ``send_task``;
- ``alarm``: the same task delivered as an alarm, with the result hook (one statement per response);
- ``alarm, hook without its write``: the hook runs but stores nothing (``store.finish`` stubbed in the
  worker), to separate the database round trip from the rest of the hook;
- ``alarm, no hook``: the hook's signal handlers disconnected: what the alarm's message alone costs.

The last two exist only to explain the first two; they lose responses and must never run elsewhere.
Prints the median of ``--repeat`` runs per variant. ``--connections`` picks how the processes hold
PostgreSQL connections: Django's pool (the default, as in ``compare.py``), ``persistent``
(``CONN_MAX_AGE = None``: Celery's Django fixup still closes them around every task) or
``persistent-reuse`` (plus Celery's ``CELERY_DB_REUSE_MAX``, which keeps them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")

VARIANTS = {
    "plain": {},
    "alarm": {},
    "alarm, hook without its write": {"BENCH_HOOK": "no-write"},
    "alarm, no hook": {"BENCH_HOOK": "off"},
}


LOG = Path(tempfile.gettempdir()) / "csched-worker-cost.log"


def celery(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A beat or worker of the benchmark's app, its output appended to ``LOG`` (named in any failure)."""
    with open(LOG, "a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.celery_app", *argv],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def fill(variant: str, tasks: int, broker: object) -> None:
    from bench.alarms import BenchAlarms
    from bench.celery_app import app
    from celery_scheduller import Message

    if variant == "plain":
        with app.producer_or_acquire() as producer:
            for n in range(tasks):
                app.send_task("bench.hit", kwargs={"run": "cost", "n": n, "due": 0}, producer=producer)
        return
    at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    BenchAlarms().dispatch_many(
        (Message.new("bench.hit", raw_request={"run": "cost", "n": n, "due": 0}), f"a{n}", at) for n in range(tasks)
    )
    beat = celery(
        "beat", "-S", "celery_scheduller", "-l", "warning", "--pidfile=", "-s", "/tmp/csched-cost-beat",
        env={"BENCH_MAX_IN_FLIGHT": "none"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while broker.llen("celery") < tasks:  # type: ignore[attr-defined]
            if time.monotonic() > deadline:
                raise RuntimeError(f"beat did not publish the alarms within 120 s; its log: {LOG}")
            time.sleep(0.2)
    finally:
        beat.terminate()
        beat.wait()


def measure(
    variant: str, tasks: int, seconds: float, concurrency: int = 8, pool: str = "threads"
) -> tuple[float, float, float]:
    """Tasks per second, worker CPU ms per task and the system (kernel) part of it, the worker draining a
    full queue."""
    import psutil
    import redis
    from django.conf import settings
    from django.db import connection

    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    hits = redis.Redis.from_url(settings.HITS_URL)
    broker.flushdb()
    hits.flushdb()
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE celery_scheduller_alarm, celery_scheduller_alarmattempt")
    fill(variant, tasks, broker)
    worker = celery(
        "worker", "-P", pool, "-c", str(concurrency), "-l", "warning", "--without-gossip", "--without-mingle",
        "--without-heartbeat", "-n", "cost@bench", env=VARIANTS[variant],
    )  # fmt: skip
    try:
        ps = psutil.Process(worker.pid)
        while hits.llen("hits:cost") < 300:
            time.sleep(0.05)
        tree = [ps, *ps.children(recursive=True)]  # prefork: the pool processes run the tasks

        def cpu() -> tuple[float, float]:
            times = [proc.cpu_times() for proc in tree]
            return sum(t.user for t in times), sum(t.system for t in times)

        cpu0, done0, t0 = cpu(), hits.llen("hits:cost"), time.monotonic()
        time.sleep(seconds)
        cpu1, done1, t1 = cpu(), hits.llen("hits:cost"), time.monotonic()
    finally:
        worker.terminate()
        worker.wait()
    if done1 >= tasks:
        raise RuntimeError("the queue ran dry while measuring: raise --tasks")
    ran = done1 - done0
    user, system = ((after - before) * 1000 / ran for before, after in zip(cpu0, cpu1, strict=True))
    return ran / (t1 - t0), user + system, system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8_000)
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pool", choices=["threads", "prefork"], default="threads", help="compare.py runs threads")
    parser.add_argument("--concurrency", type=int, default=8, help="threads or processes (compare.py: 8 threads)")
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), help="only these (default: all)")
    parser.add_argument("--connections", choices=["pool", "persistent", "persistent-reuse"], default="pool")
    args = parser.parse_args()
    os.environ["BENCH_DB_CONNECTIONS"] = args.connections  # before Django reads the settings
    from bench.compare import prepare_database

    prepare_database()
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in args.variant or VARIANTS}
    for _ in range(args.repeat):  # interleaved, so drift in the machine's load hits every variant alike
        for name in results:
            results[name].append(measure(name, args.tasks, args.seconds, args.concurrency, args.pool))
            rate, cpu, system = results[name][-1]
            print(f"  {name}: {rate:.0f} tasks/s, {cpu:.3f} ms CPU/task ({system:.3f} system)", flush=True)
    plain_cpu = statistics.median(run[1] for run in results.get("plain") or [(0, float("nan"), 0)])
    print(f"\nconnections: {args.connections}; -P {args.pool} -c {args.concurrency}; median of {args.repeat}")
    print("| variant | tasks/s | worker CPU ms/task | of it system | × plain |\n|---|---|---|---|---|")
    for name, runs in results.items():
        rate, cpu, system = (statistics.median(run[i] for run in runs) for i in range(3))
        print(f"| {name} | {rate:.0f} | {cpu:.3f} | {system:.3f} | {cpu / plain_cpu:.2f} |")


if __name__ == "__main__":
    main()
