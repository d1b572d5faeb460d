"""How fast beat answers attempts whose response did not come: every worker gone, every alarm timing out.

    python bench/timeouts.py [--alarms 10000]

Stores ``--alarms`` alarms of the benchmark's Scheduller (its ``service_responded`` retries a timeout at
once), claims them all as beat would, moves their deadlines into the past, and has beat's engine answer
them as it does in every tick (``AlarmEngine._answer_timeouts``: lease a batch, call ``service_responded``
for each, store the decisions), in this process, logging at INFO to a file as ``celery beat -l info -f``
does. Prints the timeouts answered per second, this process's CPU and PostgreSQL's per timeout, and
checks that every alarm is pending again with its retry recorded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alarms", type=int, default=10_000)
    args = parser.parse_args()
    from bench.compare import prepare_database
    from bench.in_flight import postgres_cpu

    prepare_database()
    from django.db import connection

    from bench.alarms import BenchAlarms
    from bench.celery_app import app
    from celery_scheduller import Message, states, store
    from celery_scheduller.engine import AlarmEngine
    from celery_scheduller.models import Alarm, AlarmAttempt

    now = dt.datetime.now(dt.UTC)
    BenchAlarms().dispatch_many(
        (Message.new("bench.hit", raw_request={"n": n}), f"a{n % 1000}", now - dt.timedelta(seconds=1))
        for n in range(args.alarms)
    )
    names = [BenchAlarms.name]
    while store.claim_due(names, now, 1_000):
        pass
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {Alarm._meta.db_table} SET deadline = deadline - interval '1 hour' WHERE state = %s",
            [states.PUBLISHED],
        )
        cursor.execute(f"VACUUM ANALYZE {Alarm._meta.db_table}")
    engine = AlarmEngine(app, names=lambda: names)
    app.loader.import_default_modules()  # Celery's Django fixup sets Django up again, closing every log handler
    log = Path(tempfile.gettempdir()) / "csched-timeouts.log"
    logger = logging.getLogger("celery_scheduller")
    logger.addHandler(logging.FileHandler(log, mode="w"))
    logger.setLevel(logging.INFO)
    answered_at = dt.datetime.now(dt.UTC)
    wall, cpu, pg = time.perf_counter(), time.process_time(), postgres_cpu()
    while engine._answer_timeouts(names, answered_at):
        pass
    wall, cpu, pg = time.perf_counter() - wall, time.process_time() - cpu, postgres_cpu() - pg
    pending = Alarm.objects.filter(state=states.PENDING, attempt=1).count()
    recorded = AlarmAttempt.objects.filter(status="timeout", decision__startswith="retry").count()
    logged = sum(" retried" in line for line in log.read_text().splitlines())
    if not engine.timeouts == pending == recorded == logged == args.alarms:
        raise SystemExit(
            f"answered {engine.timeouts:,}, pending again {pending:,}, recorded {recorded:,}, logged {logged:,} "
            f"of {args.alarms:,}"
        )
    n = args.alarms
    print(
        f"{n:,} timeouts answered in {wall:.2f} s ({n / wall:,.0f}/s): beat's CPU {1000 * cpu / n:.3f} ms and "
        f"PostgreSQL's {1000 * pg / n:.3f} ms per timeout; every alarm pending again with its retry recorded and logged"
    )


if __name__ == "__main__":
    main()
