"""The worker's guard of held alarm deliveries (``prefetch.Guard``), with a fake event loop and verdicts given
by the test (no services): when it looks, on which thread, what it does with each verdict, and the due times it
keeps; and the garbage collector's freeze a started worker makes."""

from __future__ import annotations

import datetime as dt
import math
import socket
import time
from typing import Any

import pytest

from celery_scheduller import prefetch
from celery_scheduller.store import orm


class Hub:
    """Records ``call_later`` and ``call_soon``; the test runs them."""

    def __init__(self) -> None:
        self.later: list[tuple[float, Any, tuple[Any, ...]]] = []
        self.soon: list[tuple[Any, tuple[Any, ...]]] = []

    def call_later(self, delay: float, callback: Any, *args: Any) -> None:
        self.later.append((delay, callback, args))

    def call_soon(self, callback: Any, *args: Any) -> None:  # from any thread, as kombu's
        self.soon.append((callback, args))

    def run_soon(self) -> None:
        pending, self.soon = self.soon, []
        for callback, args in pending:
            callback(*args)

    def run_all(self) -> None:
        pending, self.later = self.later, []
        for _delay, callback, args in pending:
            callback(*args)


class Consumer:
    def __init__(self) -> None:
        self.hub = Hub()


class Ref:
    def __init__(self, pk: int, deadline: dt.datetime) -> None:
        self.pk, self.message_id, self.attempt, self.deadline = pk, f"m{pk}", 1, deadline


class Request:
    def __init__(self, pk: int, due_in: float) -> None:
        self.id = f"m{pk}#1.{pk}"
        self.eta = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=due_in)
        self.ref = Ref(pk, self.eta + dt.timedelta(seconds=5))


@pytest.fixture
def guard(monkeypatch):
    monkeypatch.setattr(prefetch, "_held_attempt", lambda request: getattr(request, "ref", None))
    revoked: list[str] = []
    monkeypatch.setattr(prefetch.compat, "mark_revoked", lambda request: revoked.append(request.id))
    looked: list[list[int]] = []
    verdicts: dict[int, str] = {}

    def held_verdicts(refs: list[Ref]) -> dict[int, str]:
        looked.append([ref.pk for ref in refs])
        return {ref.pk: verdicts[ref.pk] for ref in refs if ref.pk in verdicts}

    monkeypatch.setattr("celery_scheduller.store.held_verdicts", held_verdicts)
    from celery_scheduller.testing import KitClock

    monkeypatch.setattr("celery_scheduller.clock.default", KitClock(frozen=False))  # this host's time, no database
    made = prefetch.Guard(Consumer())
    made.revoked, made.looked, made.verdicts = revoked, looked, verdicts  # type: ignore[attr-defined]
    monkeypatch.setattr(prefetch, "_guard", [made])
    monkeypatch.setattr(prefetch, "due_times", prefetch.DueTimes())
    return made


def test_held_deliveries_are_looked_up_together_40_to_70_ms_before_they_are_due(guard):
    requests = [Request(pk, due_in) for pk, due_in in ((1, 1.0), (2, 1.0001), (3, 2.0))]
    for request in requests:
        guard.received(request)
    guard.received(Request(4, 0.03))  # due within the look-ahead: looked at when due, not now
    delays = sorted(delay for delay, *_ in guard.consumer.hub.later)
    assert len(delays) == 2  # the first two share a slot
    assert 1.0 - prefetch.LOOK_AHEAD - prefetch.SLOT - 0.01 <= delays[0] <= 1.0 - prefetch.LOOK_AHEAD
    guard.verdicts.update({1: orm.RUN, 2: orm.DROP, 3: orm.RUN})
    guard.consumer.hub.run_all()
    assert sorted(map(sorted, guard.looked)) == [[1, 2], [3]]
    assert guard.decided == {requests[0].id: orm.RUN, requests[1].id: orm.DROP, requests[2].id: orm.RUN}


def test_with_a_looker_the_looks_run_on_its_thread_and_the_event_loop_only_hands_them_over(guard, monkeypatch):
    import threading

    monkeypatch.setattr(prefetch.writer, "own_connection", lambda: None)
    threads: list[str] = []
    from celery_scheduller import store

    inner = store.held_verdicts

    def on_which_thread(refs: list[Ref]) -> dict[int, str]:
        threads.append(threading.current_thread().name)
        return inner(refs)

    monkeypatch.setattr("celery_scheduller.store.held_verdicts", on_which_thread)
    guard.looker = prefetch.Looker()
    requests = [Request(pk, 1.0 + pk * 0.0001) for pk in (1, 2, 3)]
    for request in requests:
        guard.received(request)
    guard.verdicts.update({1: orm.RUN, 2: orm.DROP})  # 3: its row locked, decided when due
    guard.consumer.hub.run_all()  # the slot's time: handed over, not looked up here
    deadline = time.monotonic() + 5
    while len(guard.decided) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert threads == ["celery_scheduller-guard"] * 2 and guard.looked == [[], [1, 2, 3]]  # its first look: at nothing
    assert guard.decided == {requests[0].id: orm.RUN, requests[1].id: orm.DROP}
    ran: list[str] = []
    on_due = guard.wrap(lambda request: ran.append(request.id))
    on_due(requests[0])
    assert ran == [requests[0].id] and guard.looked == [[], [1, 2, 3]]  # decided ahead: no lookup when due


def _until(condition: Any) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, "the looker did not answer within 5 s"
        time.sleep(0.002)


def test_a_delivery_due_before_its_look_ends_waits_for_the_looker_and_the_loop_never_looks_itself(guard, monkeypatch):
    import threading

    monkeypatch.setattr(prefetch.writer, "own_connection", lambda: None)
    monkeypatch.setattr(prefetch.writer, "connect", lambda: None)
    go = threading.Event()
    threads: list[str] = []
    from celery_scheduller import store

    answer = store.held_verdicts

    def slow(refs: list[Ref]) -> dict[int, str]:  # a look that takes its time (a slow database)
        if not refs:
            return answer(refs)  # the looker's first look, at nothing, when it starts
        threads.append(threading.current_thread().name)
        go.wait(5)
        return answer(refs)

    monkeypatch.setattr("celery_scheduller.store.held_verdicts", slow)
    guard.looker = prefetch.Looker()
    held, late = Request(1, 1.0), Request(2, -0.001)  # ``late`` was taken in after its time
    guard.verdicts.update({1: orm.RUN, 2: orm.DROP})
    guard.received(held)
    guard.consumer.hub.run_all()  # the slot's time: the look goes to the looker, which waits on the database
    _until(lambda: threads == ["celery_scheduller-guard"])
    ran: list[str] = []
    on_due = guard.wrap(lambda request: ran.append(request.id))
    assert on_due(held) is None and on_due(late) is None  # due: neither runs unchecked, the loop goes on
    assert ran == [] and set(guard.awaiting) == {held.id, late.id}
    go.set()
    _until(lambda: not guard.looking)
    assert sorted(map(sorted, guard.looked)) == [[], [1], [2]]  # ``held`` was not looked up a second time
    assert threads == ["celery_scheduller-guard"] * 2
    _until(lambda: guard.consumer.hub.soon)
    guard.consumer.hub.run_soon()  # the event loop hands them on
    assert ran == [held.id, late.id] and guard.revoked == [late.id] and guard.awaiting == {}


def test_when_due_a_current_delivery_runs_a_stale_one_is_revoked_and_a_locked_one_waits(guard):
    ran: list[str] = []
    on_due = guard.wrap(lambda request: ran.append(request.id))
    current, stale, locked = Request(1, -0.001), Request(2, -0.001), Request(3, -0.001)
    guard.decided.update({current.id: orm.RUN, stale.id: orm.DROP})
    on_due(current)
    on_due(stale)
    assert ran == [current.id, stale.id] and guard.revoked == [stale.id]  # Celery drops a revoked request
    assert guard.looked == []  # decided ahead: no lookup at the due time

    guard.verdicts[3] = orm.WAIT  # its row is locked by a cancel not yet committed
    on_due(locked)  # looked up at once (it was not decided ahead)
    assert locked.id not in ran and [delay for delay, *_ in guard.consumer.hub.later] == [prefetch.RECHECK]
    guard.verdicts[3] = orm.DROP  # the cancel committed
    guard.consumer.hub.run_all()
    assert locked.id in ran and guard.revoked[-1] == locked.id


def test_a_delivery_whose_lookup_fails_is_not_run_unchecked_until_its_deadline(guard, monkeypatch):
    def failing(refs: Any) -> dict[int, str]:
        raise RuntimeError("the database is away")

    monkeypatch.setattr("celery_scheduller.store.held_verdicts", failing)
    monkeypatch.setattr(prefetch.db, "close_if_unusable", lambda: None)
    ran: list[str] = []
    on_due = guard.wrap(lambda request: ran.append(request.id))
    request = Request(1, -0.001)
    on_due(request)
    assert ran == [] and len(guard.waiting) == 1
    request.ref.deadline = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)  # its deadline passed
    guard.consumer.hub.run_all()
    assert ran == [request.id] and guard.revoked == [request.id]  # handed on as revoked: beat answers it lost


def test_a_delivery_not_decided_ahead_is_looked_up_with_every_overdue_look(guard):
    ran: list[str] = []
    on_due = guard.wrap(lambda request: ran.append(request.id))
    requests = [Request(pk, 0.2) for pk in (1, 2, 3)]
    for request in requests:
        guard.received(request)  # their looks are scheduled, but the event loop is behind: none has run
    guard.slots = {slot - 10.0: found for slot, found in guard.slots.items()}  # every look's time has passed
    guard.verdicts.update({1: orm.RUN, 2: orm.RUN, 3: orm.DROP})
    on_due(requests[0])
    assert guard.looked == [[1, 2, 3]] and ran == [requests[0].id]  # one lookup decided all three
    on_due(requests[1])
    on_due(requests[2])
    assert guard.looked == [[1, 2, 3]] and ran == [r.id for r in requests] and guard.revoked == [requests[2].id]


def test_other_tasks_pass_through_untouched(guard):
    ran: list[Any] = []
    on_due = guard.wrap(lambda request, *args: ran.append((request, args)))
    plain = object()
    on_due(plain, "bucket")
    assert ran == [(plain, ("bucket",))] and guard.looked == []


def test_work_waits_for_a_gap_between_held_due_times(guard):
    now = time.time()
    prefetch.due_times.add(now + 0.001, now)
    assert 0.001 <= prefetch.quiet_delay(0.003) <= 0.003  # just past the alarm due in 1 ms
    assert prefetch.quiet_delay(0.0005) == 0.0  # room enough before it
    prefetch.due_times.add(now - 1.0, now)  # a past one is dropped when the next is added
    assert prefetch.due_times.soonest(now, 1) == [pytest.approx(now + 0.001)]
    for n in range(200):  # due every 0.1 ms for 20 ms: no gap of 3 ms within 10 ms, so no waiting
        prefetch.due_times.add(now + 0.002 + n * 0.0001, now)
    assert prefetch.quiet_delay(0.003, 0.01) == 0.0


def test_a_started_worker_freezes_what_it_holds_out_of_the_collectors_view_unless_told_not_to(settings):
    import gc

    from celery_scheduller import hooks

    gc.unfreeze()
    try:
        settings.CELERY_SCHEDULLER_WORKER_GC_FREEZE = False
        hooks._freeze_gc()
        assert gc.get_freeze_count() == 0
        settings.CELERY_SCHEDULLER_WORKER_GC_FREEZE = True
        hooks._freeze_gc()
        frozen = gc.get_freeze_count()
        assert frozen > 1_000  # the modules, Django's and pytest's objects
        held = [object() for _ in range(10)]  # noqa: F841 - made after the freeze: the collector still sees them
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_a_started_worker_starts_the_looker_and_where_it_runs_tasks_the_writer_before_the_first_delivery(
    guard, monkeypatch, settings
):
    from celery.concurrency import prefork, thread

    from celery_scheduller import hooks

    settings.CELERY_SCHEDULLER_WORKER_GC_FREEZE = False
    started: list[str] = []

    class Looker:
        def start(self) -> None:
            started.append("looker")

    guard.looker = Looker()
    monkeypatch.setattr(hooks.writer, "serves", lambda: True)
    monkeypatch.setattr(hooks.writer.default, "warm", lambda: started.append("writer"))
    consumer = Consumer()
    consumer.pool = object.__new__(thread.TaskPool)  # type: ignore[attr-defined]
    hooks._warm_up(sender=consumer)  # worker_ready, -P threads: tasks run here
    assert started == ["looker", "writer"]
    started.clear()
    consumer.pool = object.__new__(prefork.TaskPool)  # type: ignore[attr-defined]
    hooks._warm_up(sender=consumer)  # worker_ready, prefork: the children answer, each its own writer
    assert started == ["looker"]
    started.clear()
    hooks._warm_up()  # worker_process_init in a prefork child
    assert started == ["writer"]


def test_the_soonest_held_due_times_come_in_order_and_the_past_ones_are_dropped():
    import heapq
    import random

    due_times, now = prefetch.DueTimes(), 1_000.0
    held = [now + random.uniform(-1.0, 2.0) for _ in range(5_000)]
    for due in held:
        due_times.add(due, now - 5)  # nothing past yet when they came
    upcoming = sorted(due for due in held if due >= now - prefetch.PAST)
    assert due_times.soonest(now, 32) == upcoming[:32]
    assert due_times.soonest(now, 10_000) == upcoming  # the past ones were dropped on the way
    assert len(due_times._heap) == len(upcoming) and due_times._heap[0] == heapq.nsmallest(1, upcoming)[0]
    assert prefetch.DueTimes().soonest(now, 5) == []


def test_a_raised_prefetch_count_is_applied_when_no_held_alarm_comes_due(guard):
    class QoS:
        def __init__(self) -> None:
            self.value, self.prev, self.applied = 8, 8, 0

        def update(self) -> None:
            self.applied += 1
            self.prev = self.value

    hub, qos = guard.consumer.hub, QoS()
    hub.on_tick = set()
    parent = type("Parent", (), {"hub": hub, "qos": qos, "initial_prefetch_count": 8})()
    step = prefetch.PromptPrefetch.__new__(prefetch.PromptPrefetch)
    step._tick = None
    step.start(parent)
    (tick,) = hub.on_tick
    qos.value = 12  # half a window came in: applied at once, nothing held comes due
    tick()
    assert qos.applied == 1 and hub.later == []
    now = time.time()
    prefetch.due_times.add(now + 0.001, now)  # a held alarm comes due within the room
    qos.value = 16
    tick()
    assert qos.applied == 1 and len(hub.later) == 1  # postponed until just past it
    delay, callback, args = hub.later.pop()
    assert 0 < delay <= prefetch.LOOK_WIGGLE
    time.sleep(delay)
    callback(*args)
    assert qos.applied == 2 and qos.prev == 16


def test_a_look_that_fails_outside_the_store_leaves_its_due_deliveries_to_the_loops_recheck(guard, monkeypatch):
    monkeypatch.setattr(prefetch.writer, "own_connection", lambda: None)
    monkeypatch.setattr(prefetch.writer, "connect", lambda: None)
    calls: list[int] = []

    def broken(batch: Any, looker: bool = False) -> None:
        calls.append(len(batch))
        raise RuntimeError("a bug in the look")

    monkeypatch.setattr(guard, "decide", broken)
    guard.looker = prefetch.Looker()
    ran: list[str] = []
    on_due = guard.wrap(lambda request: ran.append(request.id))
    request = Request(1, -0.001)
    assert on_due(request) is None  # due, no verdict: handed to the looker, whose look raises
    _until(lambda: guard.consumer.hub.soon)
    assert calls == [1] and guard.looking == set()
    guard.consumer.hub.run_soon()  # released to the recheck, not forgotten
    assert guard.awaiting == {} and len(guard.waiting) == 1 and ran == []
    assert [delay for delay, *_ in guard.consumer.hub.later] == [prefetch.RECHECK]


class _Poll:
    """An inner poll that records each timeout and answers with the events the test gives (none by default), and
    a descriptor that stands for the poller's: readable once the test writes to it."""

    def __init__(self, events: Any = None) -> None:
        self.timeouts: list[float | None] = []
        self.events = events
        self.reader, self.writer = socket.socketpair()

    def __call__(self, timeout: float | None) -> Any:
        self.timeouts.append(timeout)
        return self.events if timeout else None

    def precise(self, due_times: prefetch.DueTimes) -> prefetch.PrecisePoll:
        made = prefetch.PrecisePoll(self, due_times, self.reader.fileno())
        made.on = True  # as after a window in which the loop was mostly idle
        return made


def test_a_wait_that_ends_on_a_held_due_time_polls_whole_milliseconds_and_waits_the_rest_to_the_microsecond():
    due_times = prefetch.DueTimes()
    inner = _Poll()
    poll = inner.precise(due_times)
    now = time.time()
    due_times.add(now + 0.0073, now)
    wake = now + 0.0073
    assert poll(0.0073) is None
    ended = time.time()
    first, last = inner.timeouts
    assert math.ceil(first * 1000) == 7 and last == 0  # epoll rounds up: 7 ms, not 8; then a look without waiting
    assert ended >= wake and poll.precise == 1  # waited to the due time, not past the next millisecond


def test_the_last_fraction_of_a_millisecond_is_waited_on_the_pollers_descriptor(monkeypatch):
    import select

    due_times = prefetch.DueTimes()
    inner = _Poll()
    poll = inner.precise(due_times)
    waits: list[tuple[list[int], float]] = []
    real = select.select

    def recorded(readers: list[int], writers: list[int], errors: list[int], timeout: float) -> Any:
        waits.append((readers, timeout))
        return real(readers, writers, errors, timeout)

    monkeypatch.setattr(prefetch.select, "select", recorded)
    now = time.time()
    due_times.add(now + 0.0004, now)
    inner.writer.send(b"x")  # the poller has an event: its descriptor is readable, the wait ends at once
    poll(0.0004)  # under a millisecond to the due time: no whole one to poll
    assert inner.timeouts == [0, 0]
    ((readers, timeout),) = waits
    assert readers == [inner.reader.fileno()] and 0 < timeout < 0.0004


def test_a_wait_with_no_held_alarm_due_before_it_ends_is_the_pollers_own():
    due_times = prefetch.DueTimes()
    inner = _Poll()
    poll = inner.precise(due_times)
    now = time.time()
    due_times.add(now + 0.5, now)  # held, but due long after this wait
    poll(0.0073)
    poll(None)
    poll(0)
    assert inner.timeouts == [0.0073, None, 0] and poll.precise == 0


def test_an_event_before_the_last_millisecond_ends_the_wait_at_once():
    due_times = prefetch.DueTimes()
    inner = _Poll(events=[(5, 1)])
    poll = inner.precise(due_times)
    now = time.time()
    due_times.add(now + 0.2, now)
    started = time.time()
    assert poll(0.2) == [(5, 1)]
    assert inner.timeouts == [0.1995] and poll.precise == 0 and time.time() - started < 0.2


def test_the_consumer_step_makes_a_real_loop_poll_precisely_and_again_after_a_reset(settings):
    import threading

    from kombu.asynchronous import Hub

    settings.CELERY_SCHEDULLER_WORKER_PRECISE_WAKE = True
    hub = Hub()
    parent = type("Parent", (), {"hub": hub})()
    step = prefetch.GuardHeldAlarms.__new__(prefetch.GuardHeldAlarms)
    step.start(parent)
    assert isinstance(hub.poller.poll, prefetch.PrecisePoll)
    step.start(parent)  # started again on the same poller: wrapped once
    assert not isinstance(hub.poller.poll.inner, prefetch.PrecisePoll)
    hub.reset()  # a lost connection: a new poller
    assert not isinstance(hub.poller.poll, prefetch.PrecisePoll)
    step.start(parent)
    assert isinstance(hub.poller.poll, prefetch.PrecisePoll)
    reader, _writer = socket.socketpair()
    hub.add_reader(reader.fileno(), lambda: reader.recv(10))  # kombu's loop polls only with a reader to watch
    fired: list[float] = []
    now = time.time()
    dues = [now + prefetch.BUSY_WINDOW + 0.2 + i * 0.0113 for i in range(5)]  # after a first, idle, window
    poll = hub.poller.poll
    for due in dues:
        poll.due.add(due, now)
        hub.call_at(dt.datetime.fromtimestamp(due, dt.UTC), lambda: fired.append(time.time()))
    hub.call_at(dt.datetime.fromtimestamp(dues[-1] + 0.01, dt.UTC), hub.stop)
    loop = threading.Thread(target=hub.run_forever, daemon=True)
    loop.start()
    loop.join(5)
    assert len(fired) == 5 and all(at >= due for at, due in zip(fired, dues, strict=True))  # never before
    assert poll.precise >= 1  # the loop's waits ended on the held due times
    settings.CELERY_SCHEDULLER_WORKER_PRECISE_WAKE = False
    fresh = Hub()
    step.start(type("Parent", (), {"hub": fresh})())
    assert not isinstance(fresh.poller.poll, prefetch.PrecisePoll)
    hub.close()
    fresh.close()


def test_the_lookers_thread_looks_once_at_nothing_when_it_starts(guard, monkeypatch):
    monkeypatch.setattr(prefetch.writer, "own_connection", lambda: None)
    monkeypatch.setattr(prefetch.writer, "connect", lambda: None)
    looker = prefetch.Looker()
    looker.start()  # the worker is ready: before any delivery
    _until(lambda: guard.looked == [[]])  # parsed and planned in the looker's session now, not at the first alarm


def test_a_poller_select_cannot_wait_on_is_left_as_it_is():
    class Epoll:
        def fileno(self) -> int:
            return prefetch.FD_SETSIZE  # beyond what ``select`` takes

    class Poller:
        _epoll = Epoll()

        def poll(self, timeout: float | None) -> None:
            return None

    poller = Poller()
    own = poller.poll
    assert prefetch.PrecisePoll.install(type("Hub", (), {"poller": poller})(), prefetch.DueTimes()) is False
    assert poller.poll == own


def test_a_busy_loop_is_left_to_the_pollers_own_wake_until_it_is_idle_again():
    due_times = prefetch.DueTimes()
    inner = _Poll()
    poll = prefetch.PrecisePoll(inner, due_times, inner.reader.fileno())
    assert poll.on is False  # until a first window shows the loop is not near its limit
    poll._turn(0.1)
    assert poll.on is True
    poll._turn(0.5)  # a window in which the loop worked half the time: near its limit
    assert poll.on is False
    now = time.time()
    due_times.add(now + 0.0073, now)
    poll(0.0073)
    assert inner.timeouts == [0.0073] and poll.precise == 0  # one turn for what comes due meanwhile
    poll._turn(0.35)  # between the two marks: stays as it was
    assert poll.on is False
    poll._turn(0.1)
    assert poll.on is True
    poll._turn(0.35)
    assert poll.on is True


def test_the_precise_poll_counts_the_loops_work_between_its_waits():
    inner = _Poll()
    poll = inner.precise(prefetch.DueTimes())
    turns: list[float] = []
    poll._turn = turns.append  # type: ignore[method-assign]
    deadline = time.perf_counter() + prefetch.BUSY_WINDOW + 0.2
    while time.perf_counter() < deadline and not turns:
        poll(0)  # a wait that returns at once (the inner poll answers nothing)
        spin = time.perf_counter() + 0.002
        while time.perf_counter() < spin:  # the loop's work between two waits
            pass
    assert len(turns) == 1 and turns[0] > 0.9  # it worked nearly all of the window
