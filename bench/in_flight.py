"""What beat and PostgreSQL spend publishing a steady stream while many attempts are in flight.

    python bench/in_flight.py [--rate 1000] [--seconds 60] [--publish-ahead 60000] [--max-in-flight 110000]
                              [--pending 0]

A 60 s ``PUBLISH_AHEAD`` at 1,000 alarms a second keeps 60,000 attempts published and unanswered: the
MAX_IN_FLIGHT the README asks for then is above that. ``--rate`` alarms a second, due over ``--seconds``,
are stored first; one beat publishes them ``--publish-ahead`` ms before their time to a queue no worker
reads, so nothing is answered and the count in flight only grows. Prints beat's CPU, the CPU of every
PostgreSQL process (the server does the counting), beat's claims and how late the last alarm went out
against its publish time (due − lead). ``--pending N`` first stores N more alarms due over six days from
an hour on (``compare.fill_far``, as compare.py's ``pending`` workload does): rows each claim must not read.

Before beat starts, the same process publishes ``--reference`` tasks (default 20,000) with Celery's own
``app.send_task`` in ``producer.batch`` blocks of 10 on one producer, to a queue of their own: what a
Celery publisher alone costs per task on this machine at this moment. Beat's CPU per alarm is printed
beside it as a ratio, the figure to compare across runs (absolute times here vary by 2× from day to day).

With ``--publish-ahead 0`` and ``--seconds`` beyond the benchmark alarms' 30 s ``dispatch_timeout``, the
first attempts time out while later alarms come due: every worker gone. Beat then answers those timeouts
(a retry at once, published again) in the loop that publishes; the run still ends when the last alarm
due has gone out, and prints how many timeouts beat answered and its longest pause between publishes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")

LOG = Path(tempfile.gettempdir()) / "csched-in-flight.log"


def postgres_cpu() -> float:
    """CPU seconds used so far by the processes named postgres (the server and its backends)."""
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "postgres":
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
    return total


def send_task_cost(count: int) -> float:
    """CPU seconds per task of ``count`` ``app.send_task`` calls in batches of 10 on one producer."""
    from bench.celery_app import app

    queue = "csched-reference"
    with app.producer_or_acquire() as producer:
        app.send_task("bench.hit", kwargs={"n": -1}, queue=queue, producer=producer)  # connect, declare
        started = time.process_time()
        for first in range(0, count, 10):
            with producer.batch(max_size=10):
                for n in range(first, min(first + 10, count)):
                    app.send_task("bench.hit", kwargs={"n": n}, queue=queue, producer=producer)
        spent = time.process_time() - started
    return spent / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=1_000)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--publish-ahead", type=int, default=60_000, metavar="MS")
    parser.add_argument("--max-in-flight", type=int, default=110_000, metavar="N")
    parser.add_argument("--pending", type=int, default=0, metavar="N", help="alarms due later, stored first")
    parser.add_argument("--reference", type=int, default=20_000, metavar="N", help="send_task calls to compare with")
    args = parser.parse_args()
    os.environ["BENCH_PUBLISH_AHEAD"] = str(args.publish_ahead)  # read by bench/settings.py, here and in beat
    os.environ["BENCH_MAX_IN_FLIGHT"] = str(args.max_in_flight)
    from bench.compare import fill_far, prepare_database

    prepare_database()
    import psutil
    import redis
    from django.conf import settings

    from bench.alarms import BenchAlarms
    from celery_scheduller import Message
    from celery_scheduller.models import Alarm

    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    reference = send_task_cost(args.reference)
    broker.flushdb()  # the reference's tasks too
    if args.pending:
        fill_far(args.pending)
    count = args.rate * args.seconds
    lead = args.publish_ahead / 1000
    first_due = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lead + 5)
    step = dt.timedelta(seconds=1 / args.rate)
    last_id = (
        BenchAlarms()
        .dispatch_many(
            (Message.new("bench.hit", raw_request={"n": n}), f"a{n % 1000}", first_due + n * step) for n in range(count)
        )[-1]
        .id
    )
    last = Alarm.objects.filter(message_id=last_id, attempt__gt=0)  # the last due, published: claims go in due order
    LOG.unlink(missing_ok=True)
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.celery_app", "beat", "-S", "celery_scheduller", "-l", "info",
         "-f", str(LOG), "--pidfile=", "-s", str(Path(tempfile.gettempdir()) / "csched-in-flight-beat")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        ps = psutil.Process(beat.pid)
        beat0, pg0 = ps.cpu_times(), postgres_cpu()
        last_due = first_due + dt.timedelta(seconds=(count - 1) / args.rate)
        give_up = time.time() + lead + 5 + args.seconds + 120
        while not last.exists():
            if time.time() > give_up:
                raise RuntimeError(f"beat did not publish {count} alarms in time; its log: {LOG}")
            time.sleep(0.2)
        done_at = dt.datetime.now(dt.UTC)
        beat1, pg1 = ps.cpu_times(), postgres_cpu()
    finally:
        beat.terminate()
        beat.wait()
    beat_cpu = beat1.user + beat1.system - beat0.user - beat0.system
    text = LOG.read_text()
    claims = re.findall(r"published (\d+) alarms \(claim ([\d.]+) s", text)
    claim_ms = 1000 * sum(float(seconds) for _n, seconds in claims) / max(1, len(claims))
    published_at = [
        dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=dt.UTC)  # only differences count
        for stamp in re.findall(r"^\[([\d-]+ [\d:,]+): \w+/MainProcess\] published \d+ alarms", text, re.M)
    ]
    pause = max((b - a for a, b in itertools.pairwise(published_at)), default=dt.timedelta()).total_seconds()
    timeouts = len(re.findall(r"^\[.*\] alarm \S+ retried$", text, re.M))
    last_late = (done_at - (last_due - dt.timedelta(seconds=lead))).total_seconds()
    print(
        f"{count:,} alarms at {args.rate}/s, published {args.publish_ahead} ms ahead, cap {args.max_in_flight:,}, "
        f"{args.pending:,} pending from an hour on: "
        f"beat CPU {beat_cpu:.2f} s ({1000 * beat_cpu / count:.3f} ms/alarm), PostgreSQL CPU {pg1 - pg0:.2f} s "
        f"({1000 * (pg1 - pg0) / count:.3f} ms/alarm), {len(claims):,} claims of {claim_ms:.1f} ms on average, "
        f"the last alarm out {last_late:.2f} s after its publish time, beat's longest pause between publishes "
        f"{pause:.2f} s, {timeouts:,} timeouts answered; Celery's send_task in batches of 10: "
        f"{1000 * reference:.3f} ms/task, beat {beat_cpu / count / reference:.2f}× that"
    )


if __name__ == "__main__":
    main()
