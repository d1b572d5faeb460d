"""The worker side of publishing ahead (``PUBLISH_AHEAD``, on by default): take tasks held for their ``eta``
in as fast as they arrive, run a held alarm delivery only if it is still current when it comes due, and free
each held task when it has run. ``install`` adds the steps to the worker's consumer on ``worker_init``.

- ``PromptPrefetch`` (when ``PUBLISH_AHEAD`` is set): a worker raises its prefetch count by one per held task
  but applies the new count only after its next poll of the broker, which can wait up to 10 s once held tasks
  fill the window. The step applies a raised count before the poll: at once when half an initial window has
  come in, else within ``SETTLE`` seconds, in either case at a moment when no held alarm comes due (on AMQP
  it is a round trip to the broker). It applies to every ``eta`` task of that worker.
- ``GuardHeldAlarms`` (always): when a held alarm delivery comes due, the ``Guard`` reads its alarm's row and
  runs it only while it is still the alarm's published attempt, so a ``cancel`` or ``reschedule`` committed
  before then holds even where its revoke did not reach the worker. It also drops the fired timer entry that
  Celery 5.7 keeps on the request (a reference cycle only the garbage collector's full pass frees), so the
  task is freed when it ends.

The internals they rely on are reached through ``compat`` (logged once, and the step inactive, where a
Celery release moved them). The measurements behind them are in the docs (benchmarks, publishing ahead).
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
import queue
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps

from . import compat, db, writer

logger = logging.getLogger("celery_scheduller")

#: Seconds within which a raised prefetch count smaller than half a window is applied.
SETTLE = 0.02
#: Seconds before its due time a held alarm delivery is looked up: between LOOK_AHEAD and LOOK_AHEAD + SLOT,
#: with every delivery whose look falls in the same SLOT (one lookup for them all). Less than
#: ``states.HANDOVER_MS``: the rest is room for clocks apart and statements under way.
LOOK_AHEAD = 0.05
SLOT = 0.02
#: A look waits, at most LOOK_WIGGLE seconds (so 40 to 70 ms before the due times it decides), for a moment
#: when no held alarm comes due within LOOK_ROOM seconds: its lookup then does not delay one.
LOOK_WIGGLE = 0.01
LOOK_ROOM = 0.002
#: Seconds after a due time by which its task has been handed on (``wait_for_quiet`` waits that long past it).
PAST = 0.001
#: Seconds a response writer's store keeps the process busy (its Python side holds the GIL): in a worker whose
#: tasks run in the process that holds alarms for their time (``-P threads``), a store waits for a gap this
#: long before the next held alarm's due time, at most MAX_QUIET_WAIT, so it does not delay that alarm.
WRITE_ROOM = 0.003
MAX_QUIET_WAIT = 0.05
#: How many of the soonest held due times ``quiet_delay`` looks at for a gap.
QUIET_LOOK = 32
#: The most verdicts kept for held tasks not yet due (far more than a lead holds at any rate a worker runs).
MAX_DECIDED = 100_000
#: Seconds between looks at a due alarm delivery whose row another transaction holds, or whose look failed.
RECHECK = 0.01


class PromptPrefetch(bootsteps.StartStopStep):
    """A consumer step: apply the prefetch count raised for held ``eta`` tasks before the loop's poll."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._tick: Any = None

    def start(self, parent: Any) -> None:
        window = compat.prefetch_window(parent)
        if window is None or not parent.initial_prefetch_count:
            return  # no event loop (the solo pool, eventlet, gevent), internals moved, or prefetch disabled
        hub, qos = window
        batch = max(1, parent.initial_prefetch_count // 2)
        settling = False

        def apply() -> None:
            nonlocal settling
            settling = False
            if parent.qos is qos and qos.value != qos.prev:  # not a window of a connection since replaced
                qos.update()

        def apply_when_quiet() -> None:
            # on AMQP the new count is a round trip (basic.qos): not as a held alarm comes due
            nonlocal settling
            pause = quiet_delay(LOOK_ROOM, LOOK_WIGGLE)
            if pause <= 0:
                apply()
            elif not settling:
                settling = True
                hub.call_later(pause, apply)

        def tick() -> None:
            nonlocal settling
            raised = qos.value - (qos.prev or 0)
            if raised >= batch:
                apply_when_quiet()
            elif raised > 0 and not settling:
                settling = True
                hub.call_later(SETTLE, apply_when_quiet)

        self._tick = tick
        hub.on_tick.add(tick)

    def stop(self, parent: Any) -> None:
        if self._tick is not None and parent.hub is not None:
            parent.hub.on_tick.discard(self._tick)
        self._tick = None

    shutdown = stop


class Guard:
    """Decides whether a held alarm delivery runs when it comes due: only while it is still its alarm's
    published attempt, so a ``cancel`` or ``reschedule`` committed before then holds even where its revoke did
    not reach this worker (restarted since, or handed the task again by the broker).

    The last look is taken 40 to 70 ms before the due time (``LOOK_AHEAD``, ``SLOT``, ``LOOK_WIGGLE``), off
    the due time's path and between due times, by the ``Looker``'s thread where there is one: deliveries whose
    looks fall in the same 20 ms share one short statement, and at the due time the task is handed on at once.
    A delivery due before its look ended, or received too late for one, waits for the looker (``awaiting``),
    which has the event loop hand it on (``release``); without a looker it is looked up when due. One whose
    row another transaction holds (a cancel not yet committed: its outcome decides), or whose look failed, is
    looked at again every ``RECHECK`` until it is decided or its deadline passes (then beat answers the
    attempt as lost); it is never run unchecked."""

    def __init__(self, consumer: Any, looker: Looker | None = None) -> None:
        self.consumer = consumer
        #: where the looks ahead run: a thread of their own (``Looker``), or None for the event loop itself
        self.looker = looker
        # ``decided``, ``awaiting`` and ``looking`` are shared by the event loop and the looker's thread
        self._lock = threading.Lock()
        self.decided: dict[str, str] = {}  # task id -> the verdict of the look ahead (RUN or DROP)
        #: task id -> (on_due, request, args, attempt): due, its look with the looker; handed on by ``release``
        self.awaiting: dict[str, tuple[Callable[..., Any], Any, tuple[Any, ...], Any]] = {}
        self.looking: set[str] = set()  # task ids handed to the looker, not yet decided
        self.slots: dict[float, list[tuple[Any, Any]]] = {}  # look time -> (request, attempt) to look at then
        self.waiting: list[tuple[Callable[..., Any], Any, tuple[Any, ...], Any]] = []  # due, not yet decided
        self.rechecking = False

    # -- ahead of the due time -----------------------------------------------------------------------------

    def received(self, request: Any) -> None:
        """A task the worker took in: a held alarm delivery gets its look ``LOOK_AHEAD`` before it is due."""
        hub = getattr(self.consumer, "hub", None)
        due_in = compat.seconds_to_eta(request)
        if hub is None or due_in is None or due_in <= 0:
            return  # no event loop, no eta, or due already: looked at when due
        ref = _held_attempt(request)
        if ref is None:
            return
        now = time.time()
        due_times.add(now + due_in, now)
        if due_in <= LOOK_AHEAD:
            return  # due too soon: looked at when due
        slot = (now + due_in - LOOK_AHEAD) // SLOT * SLOT  # LOOK_AHEAD to LOOK_AHEAD + SLOT before it is due
        if slot not in self.slots:
            self.slots[slot] = []
            # the slot first: ``inspect scheduled`` lists the timer's entries whose first argument is a request
            hub.call_later(max(0.0, slot - now), self._look, slot)
        self.slots[slot].append((request, ref))

    def _look(self, slot: float, waited: float = 0.0) -> None:
        if self.looker is not None:  # the looker's thread waits for a quiet moment, the event loop does not
            batch = self.slots.pop(slot, [])
            if batch:
                with self._lock:
                    self.looking.update(str(request.id) for request, _ in batch)
                self.looker.submit(batch)
            return
        pause = min(quiet_delay(LOOK_ROOM, LOOK_WIGGLE), LOOK_WIGGLE - waited)
        if pause > 0 and slot in self.slots:  # a held alarm comes due meanwhile: look just after it
            self.consumer.hub.call_later(pause, self._look, slot, waited + pause)
            return
        batch = self.slots.pop(slot, [])
        if batch:
            self.decide(batch)

    def decide(self, batch: list[tuple[Any, Any]], looker: bool = False) -> None:
        """Look up (request, attempt) pairs and keep each verdict until its task comes due; from the event
        loop or (``looker``) the looker's thread. A row another transaction holds, or a failed look, leaves its
        delivery to be looked at again when due."""
        from .store import orm

        verdicts = self._verdicts([ref for _, ref in batch])
        with self._lock:
            if len(self.decided) > MAX_DECIDED:  # verdicts of tasks never handed on (their timer cancelled on
                for task_id in list(self.decided)[: MAX_DECIDED // 2]:  # a lost connection: redelivered)
                    del self.decided[task_id]
            for request, ref in batch:
                verdict = verdicts.get(ref.pk, orm.WAIT)
                if verdict != orm.WAIT:  # else looked at again when due
                    self.decided[str(request.id)] = verdict
            task_ids = [str(request.id) for request, _ in batch]
            self.looking.difference_update(task_ids)
            due = any(task_id in self.awaiting for task_id in task_ids)
        hub = getattr(self.consumer, "hub", None)
        if due and looker and hub is not None:
            hub.call_soon(self.release)  # tasks came due before their look ended: the event loop hands them on

    def give_up(self, batch: list[tuple[Any, Any]]) -> None:
        """The looker's thread could not decide ``batch``: its deliveries are no longer under way, and those
        already due go to the event loop's recheck (``release``), as for a failed look."""
        with self._lock:
            task_ids = [str(request.id) for request, _ in batch]
            self.looking.difference_update(task_ids)
            due = any(task_id in self.awaiting for task_id in task_ids)
        hub = getattr(self.consumer, "hub", None)
        if due and hub is not None:
            hub.call_soon(self.release)

    def release(self) -> None:
        """Event loop: hand on the due deliveries whose look (by the looker) has ended; one whose row was
        locked, or whose look failed, is looked at again every ``RECHECK``, as when it was looked up when due."""
        with self._lock:
            ended = [task_id for task_id in self.awaiting if task_id not in self.looking]
            ready = [(self.awaiting.pop(task_id), self.decided.pop(task_id, None)) for task_id in ended]
        for (on_due, request, args, ref), verdict in ready:
            if verdict is None:
                self.waiting.append((on_due, request, args, ref))
                self._schedule_decision(RECHECK)
            else:
                self._hand_on(on_due, request, args, verdict, ref)

    def _verdict_of(self, request: Any) -> str | None:
        with self._lock:
            return self.decided.pop(str(getattr(request, "id", "")), None)

    # -- at the due time ---------------------------------------------------------------------------------------

    def wrap(self, on_due: Callable[..., Any]) -> Callable[..., Any]:
        """``on_due`` that drops the fired timer entry and lets an alarm delivery through the guard."""
        from .store import orm

        @functools.wraps(on_due)
        def guarded(request: Any, *args: Any) -> Any:
            compat.drop_timer_entry(request)
            verdict = self._verdict_of(request)
            if verdict == orm.RUN:
                return on_due(request, *args)
            ref = _held_attempt(request)
            if verdict is not None:
                return self._hand_on(on_due, request, args, verdict, ref)
            if ref is None:
                return on_due(request, *args)
            if self.looker is not None:  # the looker decides it (its look under way, or a new one)
                return self._await_look(on_due, request, args, ref)
            # not looked at ahead (received late, its look not yet run, or its row locked then): look now,
            # with every delivery whose look is overdue (a backlog: many), in one lookup
            self._look_overdue((request, ref))
            verdict = self._verdict_of(request)
            if verdict is not None:
                return self._hand_on(on_due, request, args, verdict, ref)
            self.waiting.append((on_due, request, args, ref))  # its row is locked, or the lookup failed
            self._schedule_decision(RECHECK)
            return None

        return guarded

    def _await_look(self, on_due: Callable[..., Any], request: Any, args: tuple[Any, ...], ref: Any) -> Any:
        """A due delivery without a verdict, where a looker runs the looks: it waits for its look (the one under
        way, or one asked for now), and the looker has the event loop hand it on (``release``). The loop never
        waits on the database, however far behind it is."""
        task_id = str(request.id)
        with self._lock:
            verdict = self.decided.pop(task_id, None)  # the look may have ended since the first read
            if verdict is None:
                self.awaiting[task_id] = (on_due, request, args, ref)
                ask = task_id not in self.looking
                self.looking.add(task_id)
        if verdict is not None:
            return self._hand_on(on_due, request, args, verdict, ref)
        if ask:
            assert self.looker is not None
            self.looker.submit([(request, ref)])
        return None

    def _look_overdue(self, due: tuple[Any, Any]) -> None:
        """Decide ``due`` (request, attempt) now, with every delivery whose look's time has passed: where the
        event loop is behind (a burst), the timer entries of the looks wait behind those of the tasks."""
        now = time.time()
        batch = [due]
        for slot in [slot for slot in self.slots if slot <= now]:
            batch.extend(found for found in self.slots.pop(slot) if found[0] is not due[0])
        self.decide(batch)

    def _schedule_decision(self, delay: float) -> None:
        hub = getattr(self.consumer, "hub", None)
        if hub is None:  # no event loop (the solo pool): decide now
            self._decide_waiting()
        elif not self.rechecking:
            self.rechecking = True
            hub.call_later(delay, self._decide_waiting)

    def _decide_waiting(self) -> None:
        from . import clock
        from .store import orm

        self.rechecking = False
        batch, self.waiting = self.waiting, []
        if not batch:
            return
        verdicts = self._verdicts([ref for *_, ref in batch])
        now = clock.default.now_datetime()
        for on_due, request, args, ref in batch:
            verdict = verdicts.get(ref.pk, orm.WAIT)
            if verdict == orm.WAIT and now < ref.deadline:
                self.waiting.append((on_due, request, args, ref))
            else:
                self._hand_on(on_due, request, args, verdict, ref)
        if self.waiting and getattr(self.consumer, "hub", None) is not None:
            self._schedule_decision(RECHECK)

    def _hand_on(self, on_due: Callable[..., Any], request: Any, args: tuple[Any, ...], verdict: str, ref: Any) -> Any:
        from .store import orm

        if verdict != orm.RUN:
            logger.info(
                "alarm %s attempt %s was cancelled, moved or answered while a worker held it: not run",
                getattr(ref, "message_id", "?"),
                getattr(ref, "attempt", "?"),
                extra={"alarm_id": getattr(ref, "message_id", None), "action": "held_dropped"},
            )
            compat.mark_revoked(request)  # Celery acknowledges it and reports it revoked, never runs it
        return on_due(request, *args)

    def _verdicts(self, refs: list[Any]) -> dict[int, str]:
        from . import store

        try:
            return store.held_verdicts(refs)
        except Exception as exc:
            logger.warning(
                "cannot check %s held alarm deliveries against the database (%s); looked at again when due",
                len(refs),
                exc,
                extra={"action": "guard_failed", "count": len(refs)},
            )
            db.close_if_unusable()
            return {}


class Looker:
    """Runs the guard's looks ahead on a thread of its own, with a database connection of its own, so the
    event loop that starts the held tasks never waits on the database for them: at its slot's time the loop
    hands the batch over, and the thread looks it up (at a moment when no held alarm comes due:
    ``LOOK_ROOM``, at most ``LOOK_WIGGLE`` later) and leaves the verdicts for the tasks' due times. Not on
    SQLite, whose single writer lock a second connection would only contend for (``writer.serves``)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[list[tuple[Any, Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread and connect it to the database (at the worker's start: not with the first look)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="celery_scheduller-guard", daemon=True)
            self._thread.start()

    def submit(self, batch: list[tuple[Any, Any]]) -> None:
        self.start()
        self._queue.put(batch)

    def _run(self) -> None:
        writer.own_connection()
        writer.connect()
        self._warm()
        while True:
            batch = self._queue.get()
            wait_for_quiet(LOOK_ROOM, LOOK_WIGGLE)
            while len(batch) < MAX_LOOK:  # batches that came while this one waited share its statement
                try:
                    batch.extend(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not _guard:
                continue
            try:
                _guard[0].decide(batch, looker=True)
            except Exception:  # never leave a batch undecided for good: its deliveries are looked at when due
                logger.exception("the guard's look failed", extra={"action": "guard_failed", "count": len(batch)})
                _guard[0].give_up(batch)

    @staticmethod
    def _warm() -> None:
        """A look at no delivery, before the first one: the statement is parsed and planned in this thread's
        database session now, not 40 ms before the first alarm of a run (a failure is logged; the next tries)."""
        if _guard:
            _guard[0]._verdicts([])


#: The most deliveries one look takes up (the rest go in the next).
MAX_LOOK = 2_000


class PrecisePoll:
    """The event loop's poll, made to wake on time for a held alarm delivery (``WORKER_PRECISE_WAKE``).

    kombu's loop sleeps in the poller (epoll) until its next timer entry, with the timeout in whole
    milliseconds, rounded up: left alone, a task held for its ``eta`` starts up to a millisecond late, half
    of one on average. Where a held alarm comes due by the time the loop would wake, this polls to the last
    whole millisecond before the timer, then waits the rest on the poller's own descriptor with ``select``,
    whose timeout counts microseconds: any event that comes meanwhile still ends the wait at once, as
    before, and otherwise the loop wakes as its timer comes due. Any other wait is the poller's own, and so is
    every wait while the loop is busy (``BUSY_OFF``, and until a first ``BUSY_WINDOW`` has shown it is not):
    near its limit, a turn that serves several due times and messages at once keeps it from falling behind."""

    def __init__(self, poll: Callable[[float | None], Any], due: DueTimes, fileno: int) -> None:
        self.inner = poll
        self.due = due
        self.fileno = fileno
        #: waits that ended on a held due time rather than on the poller's millisecond (for the curious)
        self.precise = 0
        #: whether the loop was idle enough, over the last ``BUSY_WINDOW``, to wake on time (``BUSY_ON``); off
        #: until a first window says so, so a worker that starts near its limit is never tipped over it
        self.on = False
        self._returned = time.perf_counter()  # when the last poll returned: the loop works until the next
        self._busy = self._idle = 0.0

    def __call__(self, timeout: float | None) -> Any:
        called = time.perf_counter()
        self._busy += called - self._returned
        try:
            return self._poll(timeout)
        finally:
            self._returned = time.perf_counter()
            self._idle += self._returned - called
            if self._busy + self._idle >= BUSY_WINDOW:
                self._turn(self._busy / (self._busy + self._idle))

    def _turn(self, busy: float) -> None:
        """A window has passed: on or off by the share of it the loop was working (with a margin between)."""
        was, self._busy, self._idle = self.on, 0.0, 0.0
        self.on = busy < (BUSY_OFF if was else BUSY_ON)
        if self.on != was:
            logger.debug(
                "held alarms wake the event loop %s: it was busy %.0f%% of the last %s s",
                "on time" if self.on else "on the poller's millisecond",
                100 * busy,
                BUSY_WINDOW,
                extra={"action": "precise_wake", "busy": round(busy, 3)},
            )

    def _poll(self, timeout: float | None) -> Any:
        if timeout is None or timeout <= 0 or not self.on:
            return self.inner(timeout)
        now = time.time()
        wake = now + timeout
        soonest = self.due.soonest(now, 1)
        if not soonest or soonest[0] > wake + CEILING:
            return self.inner(timeout)  # no held alarm comes due before the poller's own wake
        whole = math.floor(timeout * 1000)
        events = self.inner((whole - 0.5) / 1000 if whole else 0)  # rounded up: ``whole`` ms at most
        if events:
            return events
        rest = wake - time.time()
        if rest > 0:
            try:
                select.select([self.fileno], [], [], rest)  # readable as soon as the poller has an event
            except (OSError, ValueError):  # the poller closed meanwhile: its own wait says what it is
                return self.inner(rest)
        self.precise += 1
        return self.inner(0)

    @classmethod
    def install(cls, hub: Any, due: DueTimes) -> bool:
        """Wrap ``hub``'s poller (again after the hub was reset, which makes a new one): kombu's loop reads
        ``poller.poll`` when it is made, after the consumer's steps have started. Only an epoll poller (Linux)
        has a descriptor to wait on; False where there is none, and the poller is left as it is."""
        poller = hub.poller
        if isinstance(getattr(poller, "poll", None), cls):
            return True
        epoll = getattr(poller, "_epoll", None)
        if epoll is None or not hasattr(epoll, "fileno") or epoll.fileno() >= FD_SETSIZE:
            return False  # ``select`` takes descriptors below FD_SETSIZE only
        poller.poll = cls(poller.poll, due, epoll.fileno())
        return True


#: Seconds a poller's timeout may be rounded up by (epoll counts whole milliseconds).
CEILING = 0.001
#: ``select`` takes descriptors below this only.
FD_SETSIZE = 1024
#: Seconds over which ``PrecisePoll`` counts how busy the event loop is. Where it worked more than BUSY_OFF of
#: that time, the loop is left to the poller's own wake, which serves several due times and messages per turn
#: (waking for each would add turns to a loop near its limit); below BUSY_ON it wakes on time again.
BUSY_WINDOW = 0.5
BUSY_OFF = 0.45
BUSY_ON = 0.3


class DueTimes:
    """The due times of the alarm deliveries this process holds (a heap, epoch seconds), for work that can
    wait to stay out of their way (``wait_for_quiet``). Pushed and popped by the event loop, read by others."""

    def __init__(self) -> None:
        self._heap: list[float] = []
        self._lock = threading.Lock()

    def add(self, due: float, now: float) -> None:
        with self._lock:
            while self._heap and self._heap[0] < now - PAST:
                heapq.heappop(self._heap)
            heapq.heappush(self._heap, due)

    def soonest(self, now: float, count: int) -> list[float]:
        """The ``count`` earliest held due times not yet past (dropping the past ones), in order: read off the
        heap's top in O(count log count), not by a pass over every held due time (a burst holds thousands)."""
        with self._lock:
            heap = self._heap
            while heap and heap[0] < now - PAST:
                heapq.heappop(heap)
            found: list[float] = []
            frontier = [(heap[0], 0)] if heap else []
            size = len(heap)
            while frontier and len(found) < count:
                due, index = heapq.heappop(frontier)
                found.append(due)
                for child in (2 * index + 1, 2 * index + 2):
                    if child < size:
                        heapq.heappush(frontier, (heap[child], child))
            return found


#: This process's held due times (filled only where a ``Guard`` runs).
due_times = DueTimes()


def quiet_delay(room: float, longest: float = 0.05) -> float:
    """Seconds until the process is clear of held alarms for ``room`` seconds: 0 when none comes due within
    ``room``; else just past the last of those before the first such gap; 0 again when there is no gap within
    ``longest`` seconds (due times that dense leave none worth waiting for)."""
    now = time.time()
    cursor = now
    soonest = due_times.soonest(now, QUIET_LOOK)
    for due in soonest:
        if due - cursor >= room:
            return cursor - now
        cursor = max(cursor, due + PAST)
        if cursor - now > longest:
            return 0.0
    return cursor - now if len(soonest) < QUIET_LOOK else 0.0  # all looked at packed together: dense


def wait_for_quiet(room: float, longest: float) -> None:
    """Sleep until no held alarm of this process comes due within ``room`` seconds, at most ``longest``
    seconds: work that holds the interpreter (a response writer's store) then runs between due times."""
    if not _guard:
        return
    waited = 0.0
    while waited < longest:
        pause = min(quiet_delay(room, longest), longest - waited)
        if pause <= 0:
            return
        time.sleep(pause)
        waited += pause


#: The one ``Guard`` of this worker process (its consumer's), once the consumer is built.
_guard: list[Guard] = []


def received(request: Any = None, **_: Any) -> None:
    """``task_received`` (main process): the guard's look ahead of a held alarm delivery."""
    if _guard and request is not None:
        _guard[0].received(request)


def _held_attempt(request: Any) -> Any:
    """The attempt an alarm delivery names, or None for any other task (or one whose header is not ours)."""
    from .wire import BadHeader, read_header

    try:
        found = read_header(getattr(request, "request_dict", None), getattr(request, "kwargs", None))
    except (BadHeader, ValueError, KeyError, TypeError):
        return None  # logged by the task hooks when it runs
    return None if found is None else found[0]


class GuardHeldAlarms(bootsteps.StartStopStep):
    """A consumer step: a held task drops its fired timer entry (so it is freed when it has run), a held alarm
    delivery goes through the ``Guard`` when it comes due, and (``WORKER_PRECISE_WAKE``) the event loop wakes on
    time for it (``PrecisePoll``)."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        # Built with the consumer, before its Tasks step reads these callbacks into each task's strategy.
        guard = Guard(parent, Looker() if writer.serves() else None)
        _guard[:] = [guard]
        writer.default.before_store = functools.partial(wait_for_quiet, WRITE_ROOM, MAX_QUIET_WAIT)
        for name in compat.eta_callbacks(parent):
            setattr(parent, name, guard.wrap(getattr(parent, name)))

    def start(self, parent: Any) -> None:
        """Each time the consumer starts (again after a lost connection, which resets the loop's poller),
        before its event loop is made."""
        from .conf import settings

        hub = getattr(parent, "hub", None)
        if hub is not None and settings.get("WORKER_PRECISE_WAKE"):
            try:
                PrecisePoll.install(hub, due_times)
            except Exception:
                logger.warning("the event loop's poller could not be made precise; it wakes on its own", exc_info=True)


def install(sender: Any = None, **_: Any) -> None:
    """``worker_init`` receiver: add ``GuardHeldAlarms`` to the worker's consumer, and ``PromptPrefetch`` when
    publishing ahead. The guard goes in whatever this worker's ``PUBLISH_AHEAD``: a beat with another setting
    may publish ahead to it."""
    from .conf import settings

    if sender is None:
        return
    steps: tuple[type[bootsteps.Step], ...] = (GuardHeldAlarms,)
    if settings.publish_ahead() > 0:
        steps = (PromptPrefetch, GuardHeldAlarms)
    sender.app.steps["consumer"].update(steps)
    logger.info(
        "alarm deliveries held for their eta are checked against the database when due%s",
        "; prefetch counts raised for eta tasks apply before each poll" if len(steps) > 1 else "",
    )
