"""A soak: alarms dispatched at a steady rate for a long time, with failures, retries and history kept.

    python bench/soak.py [--rate 200] [--minutes 30] [--due-in 5] [--fail 0.05] [--keep 60] [--beats 1]
                         [--sample 30] [--pruning on|off] [--vacuum 60] [--out bench/soak.json]
                         [--plot docs/_static/soak.png]

One process dispatches ``--rate`` alarms a second (``dispatch_many`` every 100 ms), each due ``--due-in``
seconds after its place in an even stream, for ``--minutes``; a ``--fail`` share of them fail their first
try and are retried once a second later (``bench.alarms.SoakAlarms``). Ended alarms are kept ``--keep``
seconds (``KEEP_FINISHED``). ``--beats`` beats (active-active) and one worker (threads, -c 8) on PostgreSQL and
Redis. ``--pruning off`` runs the same with one pruning pass at start and none after; ``--pruning both``
runs off, then on, and prints the ratio of their p99 lateness (first tries after the first KEEP_FINISHED).

Every ``--sample`` seconds it records: lateness percentiles of the first tries that started in that window
(task start − due), beat and worker RSS, the database's open connections, rows and size of each of the
package's tables, the overdue backlog (pending more than 1 s past due) and the rows waiting to be pruned.
At the end it waits for every alarm to end and counts what was lost (an alarm that never ran to success)
or duplicated (ran to success twice).

This machine's PostgreSQL runs with autovacuum off; ``--vacuum N`` runs ``VACUUM ANALYZE`` on the tables
every N seconds, as autovacuum would in production (0: never, and table sizes then grow with dead rows
whatever is pruned).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BENCH_DB_NAME", "csched_soak")
os.environ.setdefault("BENCH_REDIS_DBS", "10,11")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")

TABLES = ("celery_scheduller_alarm", "celery_scheduller_alarmattempt", "celery_scheduller_taskrecord")


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class Dispatcher(threading.Thread):
    """Dispatches ``rate`` alarms a second, in batches every 100 ms, until ``stop_at``."""

    def __init__(self, run: str, rate: float, due_in: float, fail: float, stop_at: float) -> None:
        super().__init__(daemon=True)
        self.run_name, self.rate, self.due_in, self.fail, self.stop_at = run, rate, due_in, fail, stop_at
        self.sent = 0
        self.failing: set[int] = set()
        self.error: BaseException | None = None

    def run(self) -> None:
        from django.db import connection

        from bench.alarms import SoakAlarms
        from celery_scheduller import Message

        alarms = SoakAlarms()
        start, wall = time.monotonic(), time.time()
        every = max(1, round(1 / self.fail)) if self.fail else 0
        try:
            while time.time() < self.stop_at:
                owed = int((time.monotonic() - start) * self.rate) - self.sent
                batch = []
                for n in range(self.sent, self.sent + max(0, owed)):
                    due = wall + self.due_in + n / self.rate  # an even stream, not a burst per batch
                    fail = bool(every) and n % every == 0
                    if fail:
                        self.failing.add(n)
                    raw = {"run": self.run_name, "n": n, "due": due, "fail": fail}
                    message = Message.new("bench.soak", raw_request=raw, id=f"{self.run_name}-{n}")
                    batch.append((message, f"agg-{n % 1000}", dt.datetime.fromtimestamp(due, dt.UTC)))
                if batch:
                    alarms.dispatch_many(batch)
                    self.sent += len(batch)
                time.sleep(0.1)
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            connection.close()


def sample(
    args: argparse.Namespace,
    run: str,
    beats: list,
    worker,
    hits,
    seen: list[int],
    started: float,
    pooled: list[tuple[float, float]],
) -> dict:
    from django.db import connection

    from celery_scheduller import states

    raw = hits.lrange(f"soak:{run}", seen[0], -1)
    seen[0] += len(raw)
    late = []
    for line in raw:
        _n, due, began, attempt, _outcome = line.decode().split()
        if attempt == "1":
            late.append((float(began) - float(due)) * 1000)
            pooled.append((float(began) - started, late[-1]))
    now = dt.datetime.now(dt.UTC)
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
        connections = cursor.fetchone()[0]
        tables = {}
        for table in TABLES:
            cursor.execute(f"SELECT count(*), pg_total_relation_size(%s) FROM {table}", [table])
            rows, size = cursor.fetchone()
            tables[table.removeprefix("celery_scheduller_")] = {"rows": rows, "mb": round(size / 2**20, 1)}
        cursor.execute(
            "SELECT count(*), min(dispatch_at) FROM celery_scheduller_alarm WHERE state = %s AND dispatch_at < %s",
            [states.PENDING, now - dt.timedelta(seconds=1)],
        )
        overdue, oldest = cursor.fetchone()
        cursor.execute(
            "SELECT state, count(*) FROM celery_scheduller_alarm GROUP BY state",
        )
        by_state = dict(cursor.fetchall())
        cursor.execute(
            "SELECT count(*) FROM celery_scheduller_alarm WHERE finished_at < %s",
            [now - dt.timedelta(seconds=args.keep)],
        )
        waiting = cursor.fetchone()[0]
    return {
        "t": round(time.time() - started, 1),
        "late_n": len(late),
        "p50_ms": percentile(late, 0.5),
        "p90_ms": percentile(late, 0.9),
        "p99_ms": percentile(late, 0.99),
        "max_ms": max(late, default=None),
        "beat_mb": [round(b.ps.memory_info().rss / 2**20, 1) for b in beats],
        "worker_mb": round(worker.ps.memory_info().rss / 2**20, 1),
        "connections": connections,
        "tables": tables,
        "states": by_state,
        "overdue": overdue,
        "oldest_overdue_s": None if oldest is None else round((now - oldest).total_seconds(), 1),
        "waiting_to_prune": waiting,
    }


def outcome(run: str, hits, dispatcher: Dispatcher) -> dict:
    runs: dict[int, list[tuple[int, str]]] = {}
    for line in hits.lrange(f"soak:{run}", 0, -1):
        n, _due, _began, attempt, result = line.decode().split()
        runs.setdefault(int(n), []).append((int(attempt), result))
    succeeded = {n for n, tries in runs.items() if any(result == "ok" for _a, result in tries)}
    duplicated = sorted(n for n, tries in runs.items() if sum(result == "ok" for _a, result in tries) > 1)
    lost = sorted(set(range(dispatcher.sent)) - succeeded)
    retried = sum(1 for n in dispatcher.failing if n < dispatcher.sent)
    return {
        "dispatched": dispatcher.sent,
        "first_tries_failed": retried,
        "succeeded": len(succeeded),
        "lost": len(lost),
        "lost_examples": lost[:10],
        "duplicated": len(duplicated),
        "duplicated_examples": duplicated[:10],
        "runs": sum(len(tries) for tries in runs.values()),
    }


def plot(samples: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s["t"] / 60 for s in samples]
    fig, (lat, rss, size) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")):
        lat.plot(minutes, [s[key] for s in samples], label=label)
    lat.set_ylabel("lateness (ms)")
    lat.legend(loc="upper right")
    lat.set_ylim(bottom=0)
    for index in range(len(samples[0]["beat_mb"])):
        rss.plot(minutes, [s["beat_mb"][index] for s in samples], label=f"beat {index + 1}")
    rss.plot(minutes, [s["worker_mb"] for s in samples], label="worker")
    rss.set_ylabel("RSS (MB)")
    rss.set_ylim(bottom=0)
    rss.legend(loc="lower right")
    for table in ("alarm", "alarmattempt"):
        size.plot(minutes, [s["tables"][table]["mb"] for s in samples], label=f"{table} (MB)")
    rows = size.twinx()
    rows.plot(minutes, [s["tables"]["alarm"]["rows"] for s in samples], "k--", label="alarm rows")
    rows.set_ylabel("rows")
    rows.set_ylim(bottom=0)
    size.set_ylabel("table + indexes (MB)")
    size.set_ylim(bottom=0)
    size.set_xlabel("minutes")
    size.legend(loc="upper left")
    rows.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def soak(args: argparse.Namespace, pruning: str) -> dict:
    """One soak with pruning ``on`` or ``off``; returns its summary."""
    if pruning == "off":
        os.environ["BENCH_PRUNE_INTERVAL"] = str(10**9)  # beat's first pass at start, none after it
    else:
        os.environ.pop("BENCH_PRUNE_INTERVAL", None)
    from django.db import connection

    from bench.compare import Bench, prepare_database

    connection.close()
    prepare_database()
    bench = Bench(argparse.Namespace(concurrency=args.concurrency))
    bench.reset()
    run = "soak"
    worker = bench.worker(run)
    beats = [bench.beat(run, "celery_scheduller", index) for index in range(args.beats)]
    print(f"pruning {pruning}: logs in {bench.logs}", flush=True)
    started = time.time()
    stop_at = started + args.minutes * 60
    dispatcher = Dispatcher(run, args.rate, args.due_in, args.fail, stop_at)
    dispatcher.start()
    samples: list[dict] = []
    pooled: list[tuple[float, float]] = []
    seen = [0]
    next_sample = started + args.sample
    next_vacuum = started + args.vacuum if args.vacuum else float("inf")
    try:
        while dispatcher.is_alive():
            time.sleep(max(0.0, min(next_sample, next_vacuum, stop_at) - time.time()))
            if time.time() >= next_vacuum:
                with connection.cursor() as cursor:
                    cursor.execute(f"VACUUM (ANALYZE) {', '.join(TABLES)}")
                next_vacuum += args.vacuum
            if time.time() >= next_sample:
                samples.append(sample(args, run, beats, worker, bench.hits, seen, started, pooled))
                print(json.dumps(samples[-1]), flush=True)
                next_sample += args.sample
        if dispatcher.error is not None:
            raise dispatcher.error
        # everything ends: the last alarms are due ``due_in`` later, their retries a second after that
        deadline = time.time() + args.due_in + 120
        while time.time() < deadline:
            with connection.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM celery_scheduller_alarm WHERE state IN ('pending', 'published')")
                if cursor.fetchone()[0] == 0:
                    break
            time.sleep(1)
        time.sleep(1)  # the last responses' hits
        result = outcome(run, bench.hits, dispatcher)
    finally:
        for proc in [*beats, worker]:
            proc.stop()
    # after the first KEEP_FINISHED (and two samples): pruning has work from then on
    warm = args.keep + 2 * args.sample
    steady = [late for t, late in pooled if t > warm]
    summary = {
        "pruning": pruning,
        "samples": samples,
        "outcome": result,
        "steady_from_s": warm,
        "steady": {
            "first_tries": len(steady),
            "p50_ms": percentile(steady, 0.5),
            "p90_ms": percentile(steady, 0.9),
            "p99_ms": percentile(steady, 0.99),
            "max_ms": max(steady, default=None),
        },
    }
    print(json.dumps({"pruning": pruning, **summary["outcome"], **summary["steady"]}), flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--due-in", type=float, default=5)
    parser.add_argument("--fail", type=float, default=0.05)
    parser.add_argument("--keep", type=int, default=60)
    parser.add_argument("--beats", type=int, default=1)
    parser.add_argument("--sample", type=float, default=30)
    parser.add_argument("--pruning", choices=("on", "off", "both"), default="on")
    parser.add_argument("--vacuum", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    os.environ["BENCH_KEEP_FINISHED"] = str(args.keep)
    os.environ["BENCH_MAX_IN_FLIGHT"] = "none"
    if args.pruning == "both":  # each in a process of its own (the database is made anew for each)
        runs = []
        for pruning in ("off", "on"):
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                argv = [a for a in sys.argv[1:] if a not in ("both",)]
                argv = [a for i, a in enumerate(argv) if not (a == "--pruning" or (i and argv[i - 1] == "--out"))]
                argv = [a for a in argv if a != "--out"]
                subprocess.run([sys.executable, __file__, *argv, "--pruning", pruning, "--out", out.name], check=True)
                runs.append(json.loads(Path(out.name).read_text())["runs"][0])
    else:
        runs = [soak(args, args.pruning)]
    report = {
        "command": "python bench/soak.py " + " ".join(sys.argv[1:]),
        "settings": vars(args) | {"out": str(args.out), "plot": str(args.plot)},
        "runs": runs,
    }
    if len(runs) == 2 and runs[0]["steady"]["p99_ms"] and runs[1]["steady"]["p99_ms"]:
        report["p99_on_over_off"] = runs[1]["steady"]["p99_ms"] / runs[0]["steady"]["p99_ms"]
        print(f"p99 with pruning on / off: {report['p99_on_over_off']:.3f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    samples = runs[-1]["samples"]
    if args.plot and samples:
        title = (
            f"soak: {args.rate:g}/s for {args.minutes:g} min, KEEP_FINISHED {args.keep} s, "
            f"{args.fail:.0%} retried, {args.beats} beat(s)"
        )
        plot(samples, args.plot, title)


if __name__ == "__main__":
    main()
