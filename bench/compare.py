"""celery_scheduller beside Celery ETA tasks and django-celery-beat one-off tasks, in one run.

    python bench/compare.py              # every workload, every system (about 40 minutes)
    python bench/compare.py --quick      # the same at a small scale, to check the benchmark runs

Every system runs the same task (``bench.hit``: it records when it started) on the same PostgreSQL,
the same Redis broker and a fresh Celery worker (``-P threads -c 8``) per run. Lateness is task
start − due time. CPU and peak RSS are sampled from the beat and worker processes; "machine CPU" is the
busy CPU time of every process (PostgreSQL, Redis, beat, worker and this benchmark's client) from the
start of scheduling to the end of the run, with the share of the cores kept busy from the first due time
on; "scheduling" is the wall time the client took to schedule the alarms. Workloads:

- ``steady``: ``--rate`` alarms per second due over ``--seconds`` seconds (default 1,000/s × 100 s), and
  ``--low-rate`` over ``--low-seconds`` (default 250/s × 30 s: within what one worker process runs here);
- ``burst``: ``--burst`` alarms (default 10,000) due within the same second; for celery_scheduller a
  second time without ``MAX_IN_FLIGHT`` ("no in-flight cap"), to show how fast beat itself publishes;
- ``pending``: ``--pending`` alarms (default 1,000,000) due over the next days while ``--pending-rate``
  per second (default 500) come due over ``--pending-seconds`` (default 60). The alternatives get as much
  of the background as they can schedule in ``--background-budget`` seconds; the table says how much.
- ``beats``: twice the burst published by 1, 2 and 3 of our beats at once (``--beats``), without the
  in-flight cap, for scaling;
- ``rolling``: ``--rate`` alarms per second due over ``--rolling-seconds`` (default 60), each scheduled
  ``--ahead`` seconds (default 10) before it is due, while the earlier ones come due: scheduling and
  running at the same time, as in production (the other workloads schedule everything first). Each
  system's bulk call every 20 ms: ``dispatch_many``, ``apply_async(eta=)`` per task on one producer,
  django-celery-beat's rows in bulk.

``--workers 2`` runs every row with two such worker processes (worker CPU summed, peak RSS the larger
one's): where one worker process is the bound, it shows what the rest of the system does.

Plus a reference run of plain ``apply_async`` (no delay) at the steady rate: the worker CPU per task
the others are compared with. A system that has not run an alarm ``--drain`` seconds after the last
due time has lost it. Needs PostgreSQL on 127.0.0.1:5432 and Redis on 6379 (``pip install -e
.[bench,postgres,redis]``).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import csv
import dataclasses
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"

OURS, ETA, DCB, PLAIN = "celery_scheduller", "Celery ETA", "django-celery-beat", "plain apply_async"
#: the package's PUBLISH_AHEAD (ms) when it is not set
DEFAULT_AHEAD = 1_000
SCHEDULLER = "bench"
#: rolling: seconds between the client's bulk calls
ROLLING_TICK = 0.02


@dataclasses.dataclass
class Result:
    """One system on one workload."""

    workload: str
    system: str
    count: int
    scheduled_s: float = 0.0
    lateness: list[float] = dataclasses.field(default_factory=list)
    #: published − due, where the system publishes each alarm itself (beat): the scheduler without the worker
    publish_lateness: list[float] = dataclasses.field(default_factory=list)
    still_scheduled: int | None = None
    lost: int = 0
    duplicates: int = 0
    beat_cpu: float | None = None
    beat_rss: float | None = None
    worker_cpu: float = 0.0
    worker_rss: float = 0.0
    #: busy CPU seconds of the whole machine (every process: PostgreSQL, Redis, beat, worker, this
    #: benchmark) from scheduling to the end of the drain, and the share of its cores they were
    machine_cpu: float = 0.0
    machine_busy: float = 0.0
    published_within: float | None = None
    note: str = ""

    def pct(self, q: float, values: list[float] | None = None) -> float | None:
        values = self.lateness if values is None else values
        if not values:
            return None
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def row(self) -> dict[str, Any]:
        per = max(1, self.count)
        return {
            "workload": self.workload,
            "system": self.system,
            "alarms": self.count,
            "scheduling_s": round(self.scheduled_s, 2),
            "p50_s": _round(self.pct(0.5)),
            "p90_s": _round(self.pct(0.9)),
            "p99_s": _round(self.pct(0.99)),
            "max_s": _round(max(self.lateness) if self.lateness else None),
            "published_within_s": _round(self.published_within),
            "publish_p50_s": _round(self.pct(0.5, self.publish_lateness)),
            "publish_p99_s": _round(self.pct(0.99, self.publish_lateness)),
            "beat_cpu_s": _round(self.beat_cpu),
            "beat_cpu_ms_per_alarm": _round(None if self.beat_cpu is None else 1000 * self.beat_cpu / per),
            "beat_peak_rss_mb": _round(self.beat_rss),
            "worker_cpu_s": round(self.worker_cpu, 2),
            "worker_cpu_ms_per_task": round(1000 * self.worker_cpu / per, 3),
            "worker_peak_rss_mb": round(self.worker_rss, 1),
            "machine_cpu_s": round(self.machine_cpu, 1),
            "machine_cpu_ms_per_alarm": round(1000 * self.machine_cpu / per, 3),
            "machine_busy_pct": round(100 * self.machine_busy),
            "not_run": self.lost,
            "still_scheduled": self.still_scheduled,
            "duplicates": self.duplicates,
            "note": self.note,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class Proc:
    """A beat or worker process whose CPU time and peak RSS are sampled."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        import psutil

        self.name = name
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        self.ps = psutil.Process(self.popen.pid)
        self.peak_rss = 0
        self.cpu_start = 0.0

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def sample(self) -> None:
        with contextlib.suppress(Exception):  # the process may have just exited
            self.peak_rss = max(self.peak_rss, self.ps.memory_info().rss)

    def mark(self) -> None:
        """Start counting CPU and memory from now."""
        self.cpu_start = self.cpu()
        self.peak_rss = 0
        self.sample()

    def used(self) -> tuple[float, float]:
        """CPU seconds since ``mark`` and peak RSS in MB."""
        self.sample()
        return self.cpu() - self.cpu_start, self.peak_rss / 2**20

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


class _MachineCpu:
    """Busy CPU time of the whole machine (all cores, every process) since it was made, and the share
    of the cores it kept busy from ``due`` (the first due time; ``tick`` notes it) to the end."""

    def __init__(self, due: float) -> None:
        import psutil

        self.psutil = psutil
        self.due = due
        self.start = self._busy()
        self.at_due: tuple[float, float] | None = None

    def _busy(self) -> float:
        times = self.psutil.cpu_times()
        return float(sum(getattr(times, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq")))

    def tick(self) -> None:
        if self.at_due is None and time.time() >= self.due:
            self.at_due = (self._busy(), time.monotonic())

    def used(self) -> tuple[float, float]:
        """Busy CPU seconds since made, and the busy share of the cores since the first due time."""
        busy = self._busy()
        since_busy, since = self.at_due or (self.start, time.monotonic())
        capacity = (time.monotonic() - since) * (self.psutil.cpu_count() or 1)
        return busy - self.start, (busy - since_busy) / capacity if capacity > 0 else 0.0


class Sampler(threading.Thread):
    """Samples every process's RSS four times a second (and notes the machine's CPU at the first due time)."""

    def __init__(self, procs: list[Proc]) -> None:
        super().__init__(daemon=True)
        self.procs = procs
        self.machine: _MachineCpu | None = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            for proc in self.procs:
                proc.sample()
            if self.machine is not None:
                self.machine.tick()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import django

        django.setup()
        import redis
        from django.conf import settings

        self.args = args
        self.hits = redis.Redis.from_url(settings.HITS_URL)
        self.broker = (
            redis.Redis.from_url(settings.CELERY_BROKER_URL) if settings.CELERY_BROKER_URL.startswith("redis") else None
        )
        self.logs = Path(tempfile.mkdtemp(prefix="csched-bench-"))
        self.runs = 0

    # -- set-up -------------------------------------------------------------------------------------

    def reset(self) -> None:
        from django.db import connection

        if self.broker is not None:
            self.broker.flushdb()
        else:
            from bench.celery_app import app

            app.control.purge()  # the task queue of another broker
        self.hits.flushdb()
        with connection.cursor() as cursor:
            cursor.execute(
                "TRUNCATE celery_scheduller_alarm, celery_scheduller_alarmattempt, celery_scheduller_beatrecord, "
                "django_celery_beat_periodictask, django_celery_beat_clockedschedule, "
                "django_celery_beat_periodictasks"
            )

    def worker(self, run: str, startup: float = 60, env: dict[str, str] | None = None) -> Proc:
        """A fresh worker, returned once it ran a ping sent behind whatever the queue already holds
        (for ETA with a background, tens of thousands of ETA tasks it takes into memory first)."""
        proc = Proc(
            "worker",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.celery_app",
                "worker",
                "-P",
                "threads",
                "-c",
                str(self.args.concurrency),
                "-l",
                "warning",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"{run}@bench",
            ],
            self.logs / f"{run}-worker.log",
            env,
        )
        from bench.celery_app import app

        key = f"ping:{run}"
        app.send_task("bench.ping", args=[key])
        try:
            _wait(lambda: self.hits.get(key) is not None, startup, f"worker of {run} did not start; see {proc.log}")
        except BaseException:
            proc.stop()  # else it outlives the benchmark and consumes the next runs' tasks
            raise
        return proc

    def beat(self, run: str, scheduler: str, index: int = 0, env: dict[str, str] | None = None) -> Proc:
        log = self.logs / f"{run}-beat{index}.log"
        proc = Proc(
            "beat",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.celery_app",
                "beat",
                "-S",
                scheduler,
                "-l",
                "info",
                "-f",
                str(log),
                "--pidfile=",
                "-s",
                str(self.logs / f"{run}-beat{index}-schedule"),
            ],
            self.logs / f"{run}-beat{index}.out",
            env,
        )
        _wait(lambda: log.exists() and "beat: Starting" in log.read_text(), 60, f"beat of {run} did not start")
        return proc

    def idle(self, seconds: float) -> Result:
        """Beat with nothing due for a long while (one alarm due in an hour): the CPU it spends waiting."""
        from bench.alarms import BenchAlarms
        from celery_scheduller import Message

        self.runs += 1
        run = f"r{self.runs}"
        workload = f"idle {seconds:g} s (one alarm due in an hour)"
        print(f"· {workload}: {OURS}", flush=True)
        self.reset()
        BenchAlarms().dispatch(Message.new("bench.hit", {"run": run, "n": 0, "due": 0}), run, in_ms=3_600_000)
        beat = self.beat(run, OURS)
        try:
            time.sleep(5)  # started: its first window loaded
            beat.mark()
            time.sleep(seconds)
            cpu, rss = beat.used()
        finally:
            beat.stop()
        result = Result(workload, OURS, 0, beat_cpu=cpu, beat_rss=rss)
        result.note = f"{100 * cpu / seconds:.2f} % of one core"
        print(f"  {json.dumps(result.row())}", flush=True)
        return result

    # -- scheduling ---------------------------------------------------------------------------------

    def schedule(self, system: str, run: str, dues: list[float]) -> None:
        if system == OURS:
            self._schedule_ours(run, dues)
        elif system == ETA:
            self._schedule_eta(run, dues)
        elif system == DCB:
            self._schedule_dcb(run, dues)
        else:
            raise ValueError(system)

    def _schedule_ours(self, run: str, dues: list[float], first: int = 0) -> None:
        from bench.alarms import BenchAlarms
        from celery_scheduller import Message

        alarms = BenchAlarms()
        for chunk in _chunks(range(len(dues)), 10_000):
            alarms.dispatch_many(
                [
                    (
                        Message.new(
                            "bench.hit",
                            raw_request={"run": run, "n": first + n, "due": dues[n]},
                            id=f"{run}-{first + n}",
                        ),
                        f"agg-{n % 1000}",
                        _aware(dues[n]),
                    )
                    for n in chunk
                ]
            )

    def _schedule_rolling(self, system: str, run: str, dues: list[float], ahead: float) -> None:
        """Schedule each alarm ``ahead`` seconds before it is due, every 20 ms those whose time came (at
        once again when a call took longer)."""
        first = 0
        tick = time.monotonic()
        while first < len(dues):
            ready = bisect.bisect_right(dues, time.time() + ahead, lo=first)
            if ready > first:
                if system == OURS:
                    self._schedule_ours(run, dues[first:ready], first)
                elif system == ETA:
                    self._schedule_eta(run, dues[first:ready], first)
                else:
                    self._schedule_dcb(run, dues[first:ready], first)
                first = ready
            tick = max(tick + ROLLING_TICK, time.monotonic())
            time.sleep(max(0.0, tick - time.monotonic()))

    def _schedule_eta(self, run: str, dues: list[float], first: int = 0, budget: float | None = None) -> int:
        from bench.celery_app import app
        from bench.tasks import hit

        stop_at = None if budget is None else time.monotonic() + budget
        with app.producer_or_acquire() as producer:
            for n, due in enumerate(dues):
                hit.apply_async(kwargs={"run": run, "n": first + n, "due": due}, eta=_aware(due), producer=producer)
                if stop_at is not None and n % 1000 == 0 and time.monotonic() > stop_at:
                    return n + 1
        return len(dues)

    def _schedule_dcb(self, run: str, dues: list[float], first: int = 0, budget: float | None = None) -> int:
        from django_celery_beat.models import ClockedSchedule, PeriodicTask, PeriodicTasks

        stop_at = None if budget is None else time.monotonic() + budget
        done = 0
        for chunk in _chunks(range(len(dues)), 5_000):
            clocks = ClockedSchedule.objects.bulk_create([ClockedSchedule(clocked_time=_aware(dues[n])) for n in chunk])
            PeriodicTask.objects.bulk_create(
                [
                    PeriodicTask(
                        name=f"{run}-{first + n}",
                        task="bench.hit",
                        clocked=clock,
                        one_off=True,
                        kwargs=json.dumps({"run": run, "n": first + n, "due": dues[n]}),
                    )
                    for n, clock in zip(chunk, clocks, strict=True)
                ]
            )
            done += len(chunk)
            if stop_at is not None and time.monotonic() > stop_at:
                break
        PeriodicTasks.update_changed()
        return done

    def background(self, system: str, run: str, count: int) -> tuple[int, str]:
        """Schedule ``count`` alarms due over the next days; returns how many and a note."""
        start = time.time() + FAR_FROM
        dues = [start + n * (FAR_SPREAD / max(1, count)) for n in range(count)]
        budget = self.args.background_budget
        if system == OURS:
            fill_far(count, start)
            return count, ""
        if system == ETA:
            done = self._schedule_eta("far", dues, budget=budget)
        else:
            done = self._schedule_dcb("far", dues, budget=budget)
        return done, "" if done == count else f"{done:,} of {count:,} background alarms scheduled in {budget:.0f} s"

    # -- one run ------------------------------------------------------------------------------------

    def run(
        self,
        workload: str,
        system: str,
        dues: list[float],
        *,
        pending: int = 0,
        beats: int = 1,
        capped: bool = True,
        ahead: float | None = None,
    ) -> Result:
        """One system on one workload; ``ahead``: each alarm scheduled that many seconds before it is due,
        while the run goes on (else all of them first)."""
        self.runs += 1
        run = f"r{self.runs}"
        label = system if beats == 1 else f"{system} × {beats} beats"
        if not capped:
            label += ", no in-flight cap"
        elif system == OURS and self.args.max_in_flight != 1_000:
            label += f", in-flight cap {self.args.max_in_flight:,}"
        if self.args.workers > 1:
            label += f", {self.args.workers} workers"
        if self.args.concurrency != 8:
            label += f", -c {self.args.concurrency}"
        if system == OURS and self.args.publish_ahead != DEFAULT_AHEAD:
            label += f", PUBLISH_AHEAD = {self.args.publish_ahead}"
            label += "" if self.args.publish_ahead else " (published when due: the former default)"
        if system == OURS and self.args.no_ack_emulation:
            label += ", Redis ack emulation off"
        print(f"· {workload}: {label}, {len(dues):,} alarms", flush=True)
        self.reset()
        result = Result(workload, label, len(dues))
        notes = []
        if pending:
            started = time.monotonic()
            done, note = self.background(system, run, pending)
            notes.append(note or f"{done:,} pending in the background (filled in {time.monotonic() - started:.0f} s)")
        # with --workers, each waits for a ping of its own, which any of the started ones may run;
        # the other systems' workers are Celery's own (PUBLISH_AHEAD adds prefetch.PromptPrefetch)
        stock = None if system == OURS else {"BENCH_PUBLISH_AHEAD": "0", "BENCH_STOCK_WORKER": "1"}
        if system == OURS and self.args.no_ack_emulation:
            stock = {"BENCH_ACK_EMULATION": "off"}
        workers = [
            self.worker(f"{run}w{index}" if index else run, startup=300 if pending else 60, env=stock)
            for index in range(self.args.workers)
        ]
        procs = [*workers]
        scheduler = {OURS: "celery_scheduller", DCB: "django_celery_beat.schedulers:DatabaseScheduler"}.get(system)
        if scheduler:
            env = {} if capped else {"BENCH_MAX_IN_FLIGHT": "none"}
            procs += [self.beat(run, scheduler, index, env) for index in range(beats)]
        sampler = Sampler(procs)
        sampler.start()
        try:
            for proc in procs:
                proc.mark()
            lead = self._lead(system, len(dues)) if ahead is None else ahead
            base = time.time() + lead
            dues = [base + due for due in dues]
            sampler.machine = machine = _MachineCpu(min(dues))
            started = time.monotonic()
            if system == PLAIN:
                self._publish_paced(run, dues)
            elif ahead is not None:
                self._schedule_rolling(system, run, dues, ahead)
            else:
                self.schedule(system, run, dues)
            result.scheduled_s = time.monotonic() - started
            if system != PLAIN and ahead is None and time.time() > dues[0]:
                notes.append(f"scheduling ran {time.time() - dues[0]:.1f} s past the first due time")
            self._drain(run, dues)
            result.machine_cpu, result.machine_busy = machine.used()
            used = [worker.used() for worker in workers]
            result.worker_cpu = sum(cpu for cpu, _ in used)
            result.worker_rss = max(rss for _, rss in used)
            beat_procs = procs[len(workers) :]
            if beat_procs:
                used = [proc.used() for proc in beat_procs]
                result.beat_cpu = sum(cpu for cpu, _ in used)
                result.beat_rss = max(rss for _, rss in used)
                result.published_within = self._published_within(system, run, beats, min(dues), len(dues))
                if system == DCB:
                    sent = self._dcb_sent(run)
                    result.publish_lateness = [when - dues[n] for n, when in sent.items() if n < len(dues)]
                if system == OURS and pending:
                    loads = self._first_load_seconds(run)
                    if loads is not None:
                        notes.append(f"beat's first window load {loads:.3f} s")
        finally:
            sampler.done.set()
            for proc in reversed(procs):
                proc.stop()
        # counted once nothing runs any more: a task finishing meanwhile would be neither run nor scheduled
        notes.append(self._tally(run, dues, result) or "")
        if self.args.timeline:
            self._write_timeline(run, f"{workload}: {label}", dues)
        result.still_scheduled = self._still_scheduled(system, run)
        if result.still_scheduled is not None and result.still_scheduled < result.lost:
            notes.append(self._unaccounted(run, len(dues)))
        result.note = "; ".join(note for note in notes if note)
        print(f"  {json.dumps(result.row())}", flush=True)
        return result

    def _lead(self, system: str, count: int) -> float:
        # time to schedule before the first alarm is due; measured rates with room to spare, and for
        # celery_scheduller the publishing lead on top, so that the first alarms too go out that far ahead
        per_alarm = {OURS: 0.0002, ETA: 0.0008, DCB: 0.0004, PLAIN: 0.0}[system]
        ahead = self.args.publish_ahead / 1000 if system == OURS else 0.0
        return 5.0 + count * per_alarm + ahead

    def _publish_paced(self, run: str, dues: list[float]) -> None:
        from bench.celery_app import app
        from bench.tasks import hit

        with app.producer_or_acquire() as producer:
            for n, due in enumerate(dues):
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
                hit.apply_async(kwargs={"run": run, "n": n, "due": due}, producer=producer)

    def _drain(self, run: str, dues: list[float]) -> None:
        give_up = max(dues) + self.args.drain
        key = f"hits:{run}"
        while time.time() < give_up:
            if self.hits.llen(key) >= len(dues) and len(self._starts(key)) >= len(dues):
                break
            time.sleep(0.5)
        time.sleep(1.0)  # late duplicates

    def _tally(self, run: str, dues: list[float], result: Result) -> str | None:
        """Lateness, not run and duplicates from the run's hits; a note on what the duplicates were."""
        key = f"hits:{run}"
        starts = self._starts(key)
        total = self.hits.llen(key)
        result.lateness = [start - dues[n] for n, (start, _published) in starts.items()]
        published = [published - dues[n] for n, (_start, published) in starts.items() if published is not None]
        if published:
            result.publish_lateness = published
        result.lost = len(dues) - len(starts)
        result.duplicates = total - len(starts)
        if result.duplicates:  # which runs were repeats of the same message, which of a new attempt
            task_ids = Counter(task_id for *_fields, task_id in self._hits(key))
            same_id = sum(count - 1 for count in task_ids.values())
            return f"duplicates: {same_id} reruns of the same task id, {result.duplicates - same_id} new attempts"
        return None

    def _hits(self, key: str) -> Iterator[tuple[int, float, float | None, str]]:
        """Every run recorded by ``bench.hit``: (n, started, published by beat or None, task id)."""
        for raw in self.hits.lrange(key, 0, -1):
            n, _due, started, published, task_id, _worker = raw.decode().split()
            yield int(n), float(started), None if published == "-" else float(published), task_id

    def _starts(self, key: str) -> dict[int, tuple[float, float | None]]:
        """Each alarm's first run: (started, published by beat or None)."""
        first: dict[int, tuple[float, float | None]] = {}
        for n, started, published, _task_id in self._hits(key):
            if n not in first or started < first[n][0]:
                first[n] = (started, published)
        return first

    def _write_timeline(self, run: str, title: str, dues: list[float]) -> None:
        """Every run of the run's tasks, in start order, for a look at when and where lateness grew."""
        self.args.timeline.mkdir(parents=True, exist_ok=True)
        rows = sorted(raw.decode().split() for raw in self.hits.lrange(f"hits:{run}", 0, -1))
        with (self.args.timeline / f"{run}.csv").open("w", newline="") as out:
            out.write(f"# {title}\n")
            writer = csv.writer(out)
            writer.writerow(["n", "due", "published", "started", "task_id", "worker"])
            for n, _due, started, published, task_id, worker in sorted(rows, key=lambda row: float(row[2])):
                writer.writerow([n, repr(dues[int(n)]), published, started, task_id, worker])

    def _published_within(self, system: str, run: str, beats: int, first_due: float, count: int) -> float | None:
        """Seconds from the first due time until beat had published every alarm (from beat's log)."""
        sent: list[tuple[float, int]] = []
        for index in range(beats):
            for line in (self.logs / f"{run}-beat{index}.log").read_text().splitlines():
                if system == OURS:
                    found = re.search(r"^\[([\d\- :,]+): INFO/\w+\] published (\d+) alarms", line)
                else:
                    found = re.search(r"^\[([\d\- :,]+): INFO/\w+\] Scheduler: Sending due task", line)
                if found:
                    when = dt.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=dt.UTC)
                    sent.append((when.timestamp(), int(found.group(2)) if system == OURS else 1))
        total = 0
        for when, many in sorted(sent):
            total += many
            if total >= count:
                return when - first_due
        return None

    def _dcb_sent(self, run: str) -> dict[int, float]:
        """When django-celery-beat sent each one-off task (its log names the entry)."""
        sent: dict[int, float] = {}
        pattern = re.compile(rf"^\[([\d\- :,]+): INFO/\w+\] Scheduler: Sending due task {run}-(\d+) ")
        for line in (self.logs / f"{run}-beat0.log").read_text().splitlines():
            found = pattern.search(line)
            if found and int(found.group(2)) not in sent:
                when = dt.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=dt.UTC)
                sent[int(found.group(2))] = when.timestamp()
        return sent

    def _still_scheduled(self, system: str, run: str) -> int | None:
        """Alarms of the run the system still holds at the end (not run yet, not lost)."""
        from celery_scheduller.models import Alarm

        if system == OURS:
            return Alarm.objects.filter(message_id__startswith=f"{run}-").count()
        return None  # django-celery-beat disables a one-off task only at its next sync; ETA tasks live in the worker

    def _unaccounted(self, run: str, count: int) -> str:
        """celery_scheduller's alarms neither run nor still scheduled, with their ids and attempt history."""
        from celery_scheduller.models import Alarm

        ran = set(self._starts(f"hits:{run}"))
        held = set(Alarm.objects.filter(message_id__startswith=f"{run}-").values_list("message_id", flat=True))
        gone = [f"{run}-{n}" for n in range(count) if n not in ran and f"{run}-{n}" not in held]
        return f"{len(gone)} neither run nor still scheduled, e.g. {', '.join(gone[:5])}"

    def _first_load_seconds(self, run: str) -> float | None:
        found = re.search(
            r"loaded \d+ alarms of \S+ due until \S+ in ([\d.]+) s", (self.logs / f"{run}-beat0.log").read_text()
        )
        return float(found.group(1)) if found else None

    # -- the API's own costs --------------------------------------------------------------------------

    def api_costs(self, count: int) -> dict[str, float]:
        """``dispatch`` one by one, ``dispatch_many``, and the result hook's database round trips."""
        from django.db import connection
        from django.test.utils import CaptureQueriesContext

        from bench.alarms import BenchAlarms
        from celery_scheduller import Message, Response, store
        from celery_scheduller.responses import respond

        self.reset()
        with connection.cursor() as cursor:
            # measured last, after the million-row run: write its dirty pages out first, so that the
            # commits timed here do not queue behind that run's checkpoint
            cursor.execute("CHECKPOINT")
        alarms = BenchAlarms()
        at = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        started = time.perf_counter()
        for n in range(count):
            alarms.dispatch(
                Message.new("bench.hit", raw_request={"run": "api", "n": n, "due": 0}, id=f"one-{n}"), f"agg-{n}", at=at
            )
        one = (time.perf_counter() - started) / count
        # the same number of Django's own one-row inserts, each its own transaction as dispatch's is: what
        # a write costs on this machine at this moment (a round trip alone varies 2× from day to day)
        from django.contrib.auth.models import Group

        started = time.perf_counter()
        for n in range(count):
            Group.objects.create(name=f"bench-reference-{n}")
        create = (time.perf_counter() - started) / count
        Group.objects.filter(name__startswith="bench-reference-").delete()
        many = [
            (Message.new("bench.hit", raw_request={"run": "api", "n": n, "due": 0}, id=f"many-{n}"), f"agg-{n}", at)
            for n in range(count * 20)
        ]
        started = time.perf_counter()
        alarms.dispatch_many(many)
        per_second = len(many) / (time.perf_counter() - started)
        now = dt.datetime.now(dt.UTC)
        claimed = store.claim_due([SCHEDULLER], at, 1)
        ref, message = store.AttemptRef.of_row(claimed[0]), store.message_from_row(claimed[0])
        with CaptureQueriesContext(connection) as queries:
            respond(ref, message, Response("ok", value=None), now)
        return {
            "dispatch_ms": round(one * 1000, 3),
            "orm_create_ms": round(create * 1000, 3),
            "dispatch_many_per_s": round(per_second),
            "hook_queries_ok": len(queries),
        }


def _aware(moment: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(moment, dt.UTC)


def _chunks(items: range, size: int) -> Iterator[range]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _wait(check: Callable[[], bool], timeout: float, message: str) -> None:
    give_up = time.monotonic() + timeout
    while not check():
        if time.monotonic() > give_up:
            raise RuntimeError(message)
        time.sleep(0.2)


def steady(rate: float, seconds: float) -> list[float]:
    return [n / rate for n in range(int(rate * seconds))]


def burst(count: int) -> list[float]:
    return [n / count for n in range(count)]


#: The ``pending`` workload's background alarms: due over FAR_SPREAD seconds from FAR_FROM seconds on.
FAR_FROM = 3_600
FAR_SPREAD = 6 * 86_400


def fill_far(count: int, start: float | None = None) -> None:
    """Store ``count`` pending alarms of ours due evenly over FAR_SPREAD seconds from ``start`` (epoch;
    default FAR_FROM seconds from now), in one INSERT … SELECT: filling a million rows through the API is
    measured by the steady run. Then ANALYZE, so the claim is planned knowing them."""
    from django.db import connection

    start = time.time() + FAR_FROM if start is None else start
    step = FAR_SPREAD / max(1, count)
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO celery_scheduller_alarm (message_id, scheduller, task_name, raw_request, assigns,
                correlation_id, causation_id, aggregate_id, dispatch_at, state, attempt, timeout_ms,
                created_at, updated_at)
            SELECT 'far-' || n, %s, 'bench.hit', jsonb_build_object('run', 'far', 'n', n, 'due', 0),
                jsonb_build_object('dispatch_at', jsonb_build_object('$datetime', to_char(
                    to_timestamp(%s + n * %s) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS') || '+00:00')),
                'far-' || n, 'far-' || n, 'far-' || (n %% 1000), to_timestamp(%s + n * %s), 'pending', 0,
                5000, now(), now()
            FROM generate_series(0, %s - 1) AS n
            """,
            [SCHEDULLER, start, step, start, step, count],
        )
        cursor.execute("ANALYZE celery_scheduller_alarm")


def prepare_database() -> None:
    import psycopg

    name = os.environ.get("BENCH_DB_NAME", "csched_bench_run")
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def table(results: list[Result]) -> str:
    head = (
        "| workload | system | alarms | scheduling s | p50 s | p90 s | p99 s | max s | publish p50 / p99 s "
        "| all published within s | beat CPU s (ms/alarm) | beat peak RSS MB | worker CPU s (ms/task) "
        "| worker peak RSS MB | machine CPU s (ms/alarm, busy) | not run (still scheduled) | dup | note |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for result in results:
        row = result.row()

        def cell(value: object) -> str:
            return "–" if value is None else f"{value:,}" if isinstance(value, int) else str(value)

        publish = "–" if row["publish_p50_s"] is None else f"{row['publish_p50_s']} / {row['publish_p99_s']}"
        not_run = f"{row['not_run']:,}" + ("" if row["still_scheduled"] is None else f" ({row['still_scheduled']:,})")
        beat = "–" if row["beat_cpu_s"] is None else f"{row['beat_cpu_s']} ({row['beat_cpu_ms_per_alarm']})"
        machine = f"{row['machine_cpu_s']} ({row['machine_cpu_ms_per_alarm']}, {row['machine_busy_pct']} %)"
        lines.append(
            f"| {row['workload']} | {row['system']} | {row['alarms']:,} | {row['scheduling_s']} | {cell(row['p50_s'])} "
            f"| {cell(row['p90_s'])} | {cell(row['p99_s'])} | {cell(row['max_s'])} | {publish} "
            f"| {cell(row['published_within_s'])} "
            f"| {beat} | {cell(row['beat_peak_rss_mb'])} | {row['worker_cpu_s']} ({row['worker_cpu_ms_per_task']}) "
            f"| {row['worker_peak_rss_mb']} "
            f"| {machine} | {not_run} | {row['duplicates']:,} | {row['note']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="a small scale: 200/s × 5 s, bursts of 1,000, 20,000 pending"
    )
    parser.add_argument("--rate", type=float, default=1_000)
    parser.add_argument("--seconds", type=float, default=100)
    parser.add_argument("--low-rate", type=float, default=250, help="a second steady row, within one worker's pace")
    parser.add_argument("--low-seconds", type=float, default=30)
    parser.add_argument("--pending-seconds", type=float, default=60)
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--pending", type=int, default=1_000_000)
    parser.add_argument("--pending-rate", type=float, default=500)
    parser.add_argument("--background-budget", type=float, default=60, help="seconds the alternatives get to fill")
    parser.add_argument("--drain", type=float, default=60, help="seconds after the last due time before lost")
    parser.add_argument("--beats", default="1,2,3", help="beat counts for the scaling run; empty to skip")
    parser.add_argument("--rolling-seconds", type=float, default=60)
    parser.add_argument("--ahead", type=float, default=10, help="rolling: seconds each alarm is scheduled ahead")
    parser.add_argument("--workloads", default="steady,burst,pending,beats,rolling,idle")
    parser.add_argument("--metrics-rounds", type=int, default=2, help="metrics: rounds of off then on")
    parser.add_argument("--idle-seconds", type=float, default=120, help="idle: how long beat is watched")
    parser.add_argument("--systems", default=f"{OURS},{ETA},{DCB}")
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes per run (each -P threads -c 8); labels say so"
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="threads per worker process (-P threads -c N); labels say so"
    )
    parser.add_argument(
        "--broker",
        help="the Celery broker's URL (default Redis db 12; e.g. amqp://guest:guest@127.0.0.1:5672//): the same "
        "broker for every system; the hits are recorded in Redis either way",
    )
    parser.add_argument(
        "--publish-ahead",
        type=int,
        default=DEFAULT_AHEAD,
        metavar="MS",
        help="celery_scheduller's PUBLISH_AHEAD (default: the package's, 1,000): beat publishes each alarm this long "
        "before it is due, with an eta; 0 publishes when due. Its workers get the package's consumer steps (the "
        "other systems' workers stay Celery's own)",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=1_000,
        metavar="N",
        help="celery_scheduller's MAX_IN_FLIGHT in the capped rows (default 1,000, the package's default)",
    )
    parser.add_argument(
        "--no-ack-emulation",
        action="store_true",
        help="celery_scheduller's workers run with kombu's Redis ack emulation off (broker_transport_options "
        "ack_emulation=False), as the README advises for Redis workers that serve only alarms; the other "
        "systems' workers keep it (a task they hold for its eta would be lost with a killed worker)",
    )
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--timeline",
        type=Path,
        metavar="DIR",
        help="also write each run's task starts to DIR/<run>.csv (due, published, started, worker)",
    )
    args = parser.parse_args()
    os.environ["BENCH_PUBLISH_AHEAD"] = str(args.publish_ahead)  # read by bench/settings.py in every process
    os.environ["BENCH_MAX_IN_FLIGHT"] = str(args.max_in_flight)  # the rows without a cap set "none"
    if args.broker:
        os.environ["BENCH_BROKER"] = args.broker  # read by bench/settings.py here and in every process started
    if args.quick:
        args.rate, args.seconds, args.burst, args.pending, args.pending_rate = 200, 5, 1_000, 20_000, 100
        args.low_rate, args.pending_seconds, args.rolling_seconds, args.ahead = 0, 5, 5, 3
        args.background_budget, args.drain = 5, 20
    workloads = [name for name in args.workloads.split(",") if name]
    systems = [name for name in args.systems.split(",") if name]

    prepare_database()
    bench = Bench(args)
    print(f"logs in {bench.logs}", flush=True)
    results: list[Result] = []

    def each(workload: str, dues: list[float], among: list[str] = systems, **options: Any) -> None:
        """``workload`` run by each system of ``among`` in turn, on the same due times."""
        results.extend(bench.run(workload, system, dues, **options) for system in among)

    if "steady" in workloads:
        each(f"steady {args.rate:g}/s × {args.seconds:g} s", steady(args.rate, args.seconds), [*systems, PLAIN])
    if "steady" in workloads and args.low_rate:
        each(
            f"steady {args.low_rate:g}/s × {args.low_seconds:g} s",
            steady(args.low_rate, args.low_seconds),
            [*systems, PLAIN],
        )
    if "burst" in workloads:
        each(f"burst {args.burst:,} in 1 s", burst(args.burst))
        if OURS in systems:  # beat's own publishing pace, the worker's left out of the way
            results.append(bench.run(f"burst {args.burst:,} in 1 s", OURS, burst(args.burst), capped=False))
    if "pending" in workloads:
        each(
            f"{args.pending:,} pending + {args.pending_rate:g}/s × {args.pending_seconds:g} s",
            steady(args.pending_rate, args.pending_seconds),
            pending=args.pending,
        )
    if "beats" in workloads and args.beats:
        for beats in [int(b) for b in args.beats.split(",")]:
            results.append(
                bench.run(f"burst {args.burst * 2:,} in 1 s", OURS, burst(args.burst * 2), beats=beats, capped=False)
            )
    if "metrics" in workloads and OURS in systems:
        # beat's cost with the metrics (and the dashboard's activity counts) on and off, rounds alternating
        for round_ in range(args.metrics_rounds):
            for state in ("off", "on"):
                os.environ["BENCH_METRICS"] = state  # read by bench/settings.py in the processes this run starts
                name = f"steady {args.rate:g}/s × {args.seconds:g} s, metrics {state} (round {round_ + 1})"
                results.append(bench.run(name, OURS, steady(args.rate, args.seconds)))
        os.environ.pop("BENCH_METRICS", None)
    if "idle" in workloads and OURS in systems:
        results.append(bench.idle(args.idle_seconds))
    if "rolling" in workloads:
        each(
            f"rolling {args.rate:g}/s × {args.rolling_seconds:g} s, each scheduled {args.ahead:g} s ahead",
            steady(args.rate, args.rolling_seconds),
            ahead=args.ahead,
        )
    costs = bench.api_costs(200 if args.quick else 1_000)
    print()
    print(table(results))
    print()
    print(
        f"dispatch: {costs['dispatch_ms']} ms per alarm (Django's Model.objects.create of a one-field row: "
        f"{costs['orm_create_ms']} ms); dispatch_many: {costs['dispatch_many_per_s']:,} alarms/s; "
        f"result hook for OK: {costs['hook_queries_ok']} database round trip(s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [r.row() for r in results], "api": costs}, indent=2))
    bench.reset()


if __name__ == "__main__":
    main()
