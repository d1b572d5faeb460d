"""Ten million pending: what one PostgreSQL and one beat do with a year of alarms stored.

    python bench/scale.py [--sizes 1000000,10000000] [--rate 200] [--stream-seconds 60] [--out FILE]

In one run, for each size in turn (the table grows from one to the next): stores alarms through
``dispatch_many`` (10,000 a call) until the table holds that many pending, due over the next year (each
new alarm's time drawn evenly over the whole year, so every size covers all of it), and times it; then
``VACUUM ANALYZE`` (this machine's PostgreSQL runs with autovacuum off; production's autovacuum would
have analysed the table by then); then starts one beat and one worker (threads, -c 8) and, while
``--rate`` alarms a second come due for ``--stream-seconds`` (dispatched 5 s ahead, as a live project
would), records beat's first window load, beat's peak RSS and the stream's lateness; then times the
admin's first pages (``bench/admin_speed.py --database``): the changelist, a state filter, an exact
message-id search, a year drill-down and a change page.

Uses its own database (``csched_scale``) and Redis databases 8 and 9.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BENCH_DB_NAME", "csched_scale")
os.environ.setdefault("BENCH_REDIS_DBS", "8,9")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")

YEAR = 365 * 86_400
#: the stored alarms start this far from now: none of them comes due during the run
START_IN = 3_600
#: a prime coprime with every size asked for: alarm n is due at slot (n × STRIDE) mod the largest size
STRIDE = 7_919
CHUNK = 10_000


def fill(first: int, until: int, largest: int, start: float) -> float:
    """Dispatch alarms ``first``..``until - 1`` through the API; returns alarms a second."""
    from bench.alarms import BenchAlarms
    from celery_scheduller import Message

    alarms = BenchAlarms()
    step = YEAR / largest
    began = time.perf_counter()
    for low in range(first, until, CHUNK):
        batch = []
        for n in range(low, min(until, low + CHUNK)):
            due = start + ((n * STRIDE) % largest) * step
            message = Message.new("bench.hit", raw_request={"run": "far", "n": n, "due": due}, id=f"scale-{n}")
            batch.append((message, f"customer-{n % 100_000}", dt.datetime.fromtimestamp(due, dt.UTC)))
        alarms.dispatch_many(batch)
        if (low // CHUNK) % 100 == 0:
            done = low + len(batch) - first
            print(f"  {low + len(batch):,} stored ({done / (time.perf_counter() - began):,.0f}/s)", flush=True)
    return (until - first) / (time.perf_counter() - began)


def analyse() -> float:
    from django.db import connection

    began = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM (ANALYZE) celery_scheduller_alarm")
    return time.perf_counter() - began


def live(bench, size: int, rate: float, seconds: float, warmup: float) -> dict:
    """One beat and one worker while ``rate`` alarms a second come due for ``seconds``."""
    from bench.soak import Dispatcher, percentile

    run = f"live{size}-{int(time.time())}"
    worker = bench.worker(run, startup=120)
    began = time.time()
    beat = bench.beat(run, "celery_scheduller")
    log = bench.logs / f"{run}-beat0.log"
    time.sleep(warmup)  # a beat that has been running: its first claims read the indexes from disk
    dispatcher = Dispatcher(run, rate, 5.0, 0.0, time.time() + seconds)
    dispatcher.start()
    peak = 0
    while dispatcher.is_alive():
        peak = max(peak, beat.ps.memory_info().rss)
        time.sleep(0.5)
    time.sleep(10)  # the last alarms are due 5 s after they were dispatched
    peak = max(peak, beat.ps.memory_info().rss)
    lines = bench.hits.lrange(f"soak:{run}", 0, -1)
    late = [(float(line.split()[2]) - float(line.split()[1])) * 1000 for line in lines]
    ran = {int(line.split()[0]) for line in lines}
    loads = re.findall(r"loaded (\d+) alarms of bench due until \S+ in ([\d.]+) s", log.read_text())
    claims = [float(c) for c in re.findall(r"published \d+ alarms \(claim ([\d.]+) s", log.read_text())]
    beat.stop()
    worker.stop()
    return {
        "startup_s": round(time.time() - began - seconds - 10 - warmup, 1),
        "first_window_load_s": float(loads[0][1]) if loads else None,
        "first_window_alarms": int(loads[0][0]) if loads else None,
        "beat_peak_rss_mb": round(peak / 2**20, 1),
        "claims": len(claims),
        "claim_p99_ms": round((percentile(claims, 0.99) or 0) * 1000, 1),
        "claim_max_ms": round(max(claims, default=0) * 1000, 1),
        "stream": dispatcher.sent,
        "not_run": dispatcher.sent - len(ran),
        "p50_ms": round(percentile(late, 0.5) or 0, 1),
        "p99_ms": round(percentile(late, 0.99) or 0, 1),
        "max_ms": round(max(late, default=0), 1),
    }


def admin(size: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "bench/admin_speed.py",
            "--database",
            os.environ["BENCH_DB_NAME"],
            "--json",
            "--message-id",
            f"scale-{size // 2}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def table_size() -> float:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_total_relation_size('celery_scheduller_alarm')")
        return round(cursor.fetchone()[0] / 2**30, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--stream-seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=10, help="seconds beat runs before the stream starts")
    parser.add_argument("--live-only", action="store_true", help="the live phase and the admin on the table as it is")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    from bench.compare import Bench, prepare_database

    if args.live_only:
        import django

        django.setup()
        from celery_scheduller.models import Alarm

        sizes = [Alarm.objects.filter(scheduller="bench").count()]
    else:
        prepare_database()
    bench = Bench(argparse.Namespace(concurrency=8))
    if not args.live_only:
        bench.reset()
    print(f"logs in {bench.logs}", flush=True)
    start = time.time() + START_IN
    results = []
    stored = 0
    for size in sizes:
        print(f"· {size:,} pending", flush=True)
        row: dict[str, object] = {"pending": size}
        if not args.live_only:
            rate = fill(stored, size, max(sizes), start)
            stored = size
            row["dispatch_many_per_s"] = round(rate)
            row["vacuum_analyze_s"] = round(analyse(), 1)
        row["table_gb"] = table_size()
        row |= live(bench, size, args.rate, args.stream_seconds, args.warmup)
        row["admin"] = admin(size)
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.out:
        args.out.write_text(
            json.dumps({"command": "python bench/scale.py " + " ".join(sys.argv[1:]), "results": results}, indent=1)
        )
    pages = list(results[0]["admin"])
    print("\n| pending | " + " | ".join(str(r["pending"]) for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for key in (
        "dispatch_many_per_s",
        "table_gb",
        "first_window_load_s",
        "beat_peak_rss_mb",
        "claim_p99_ms",
        "claim_max_ms",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "not_run",
    ):
        print(f"| {key} | " + " | ".join(str(r.get(key)) for r in results) + " |")
    for page in pages:
        print(
            f"| admin: {page} (median / worst ms) | "
            + " | ".join(f"{r['admin'][page]['median_ms']} / {r['admin'][page]['worst_ms']}" for r in results)
            + " |"
        )


if __name__ == "__main__":
    main()
