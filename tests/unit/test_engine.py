"""Beat's decisions on the in-memory store, with a fake clock and a recording sender (no services): the
floor claims start from, the room under MAX_IN_FLIGHT, the throttle, the claim gap, giving back what is
published too late, and failing one unreadable row alone."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from typing import Any

import pytest

from celery_scheduller import engine as engine_module
from celery_scheduller.engine import AlarmEngine
from celery_scheduller.store.memory import MemoryStore

T0 = 2_000_000_000.0  # the fake clock's start (epoch seconds)


def at(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(T0 + seconds, dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class RecordingSender:
    """Publishes nothing; records ``(message id, attempt, eta)`` per attempt sent."""

    def __init__(self, clock: Clock | None = None, cost: float = 0.0) -> None:
        self.sent: list[tuple[str, int, dt.datetime | None]] = []
        self.clock, self.cost = clock, cost

    def open(self, producer: Any) -> Any:
        return contextlib.nullcontext(producer)

    def header_limit(self, producer: Any) -> int | None:
        return None

    def batch(self, producer: Any, size: int) -> Any:
        return contextlib.nullcontext()

    def send_attempt(self, producer: Any, ref: Any, message: Any, eta: Any, headers: dict[str, str]) -> None:
        self.sent.append((message.id, ref.attempt, eta))
        if self.clock is not None:
            self.clock.now += self.cost  # publishing takes time


class NoListener:
    available = False

    def due(self) -> list[tuple[str, float, float]]:
        return []

    def close(self) -> None:
        pass


@pytest.fixture
def memory() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def beat(memory: MemoryStore, clock: Clock, settings):
    settings.CELERY_SCHEDULLER_POLL_INTERVAL = 500
    settings.CELERY_SCHEDULLER_BATCH_SIZE = 10
    settings.CELERY_SCHEDULLER_MAX_IN_FLIGHT = None
    settings.CELERY_SCHEDULLER_PUBLISH_AHEAD = 0
    sender = RecordingSender()
    engine = AlarmEngine(
        app=None,  # type: ignore[arg-type]
        names=lambda: ["tests"],
        name="unit",
        clock=clock,
        listener=NoListener(),  # type: ignore[arg-type]
        store=memory,
        sender=sender,  # type: ignore[arg-type]
    )
    yield engine
    engine.callbacks.close(timeout=0)


def tick(engine: AlarmEngine, clock: Clock, seconds: float) -> float:
    clock.now = T0 + seconds
    return engine.tick(clock.now, producer=None)


def sent_ids(engine: AlarmEngine) -> list[str]:
    return [message_id for message_id, _attempt, _eta in engine.sender.sent]  # type: ignore[attr-defined]


def claims(memory: MemoryStore) -> list[tuple[Any, ...]]:
    return [call for call in memory.calls if call[0] == "claim"]


def test_a_held_alarm_is_published_at_its_time_and_not_before(beat, memory, clock):
    memory.add("a", at(1.0))
    assert tick(beat, clock, 0.0) == pytest.approx(0.5)  # the next poll comes before the due time
    assert "a" in beat.heap and sent_ids(beat) == []
    tick(beat, clock, 0.5)
    assert sent_ids(beat) == []
    assert tick(beat, clock, 0.9) == pytest.approx(0.1)  # wakes at the due time
    tick(beat, clock, 1.0)
    assert sent_ids(beat) == ["a"] and memory.state_of("a") == "published"


def test_between_polls_claims_start_at_the_floor_and_a_held_alarm_lowers_it(beat, memory, clock):
    memory.add("first", at(0.0))
    tick(beat, clock, 0.0)  # the poll claims from the beginning
    assert claims(memory)[-1][2] is None
    margin = dt.timedelta(seconds=engine_module.FLOOR_MARGIN)
    assert beat._floor == at(0.0) - margin
    memory.add("stray", at(-3.5))  # pending below even the lowered floor, not held: the next poll's
    memory.add("held", at(-2.0))  # announced late (a reschedule into the past): held, due at once
    beat.heap.push("held", T0 - 2.0)
    tick(beat, clock, 0.1)  # between polls: from the floor, lowered to the held alarm's time less the margin
    _, until, since, _limit = claims(memory)[-1]
    assert (since, until) == (at(-2.0) - margin, at(0.1))
    assert sent_ids(beat) == ["first", "held"]
    assert memory.state_of("stray") == "pending"
    tick(beat, clock, 0.5)  # the poll, from the beginning, takes it
    assert claims(memory)[-1][2] is None and sent_ids(beat)[-1] == "stray"


def test_a_full_batch_sets_the_floor_at_its_last_row_and_claims_again_at_once(beat, memory, clock):
    for n in range(25):
        memory.add(f"due-{n:02}", at(-10 + n * 0.1))
    assert tick(beat, clock, 0.0) == 0.0  # a full batch (10): more is due, claim again now
    assert beat._floor == at(-10 + 0.9) - dt.timedelta(seconds=engine_module.FLOOR_MARGIN)
    tick(beat, clock, 0.001)
    tick(beat, clock, 0.002)
    assert sent_ids(beat) == [f"due-{n:02}" for n in range(25)]
    assert tick(beat, clock, 0.003) > 0  # the last claim was not full: wait


def test_the_claim_gap_batches_a_fast_stream_and_waits_longest_for_a_slow_one(beat, memory, clock, settings):
    settings.CELERY_SCHEDULLER_BATCH_SIZE = 100
    for n in range(60):
        memory.add(f"s-{n:02}", at(1.0 + n * 0.001))  # 1,000 a second from 1.0 s on
    tick(beat, clock, 0.0)
    assert len(beat.heap) == 60
    # one alarm a second after the last claim: a slow stream, the longest gap before the next claim
    assert tick(beat, clock, 1.0) == pytest.approx(engine_module.MAX_CLAIM_GAP)
    assert sent_ids(beat) == ["s-00"]
    # 20 alarms in those 20 ms: the stream brings CLAIM_BATCH (10) in 10 ms, the next claim comes then
    assert tick(beat, clock, 1.02) == pytest.approx(0.01)
    assert len(sent_ids(beat)) == 21
    # a faster claim than MIN_CLAIM_GAP is never planned
    tick(beat, clock, 1.03)
    assert beat._claim_gap >= engine_module.MIN_CLAIM_GAP


def test_publishing_ahead_claims_a_stream_every_quarter_lead_and_a_soon_due_alarm_within_the_short_gap(
    beat, memory, clock, settings
):
    settings.CELERY_SCHEDULLER_PUBLISH_AHEAD = 1_000
    settings.CELERY_SCHEDULLER_BATCH_SIZE = 500
    ahead_batch, ahead_min = engine_module.AHEAD_CLAIM_BATCH, engine_module.AHEAD_MIN_GAP
    assert engine_module.claim_pacing(1.0) == (ahead_batch, ahead_min, engine_module.AHEAD_CLAIM_GAP)
    short = engine_module.MAX_CLAIM_GAP
    assert engine_module.claim_pacing(0.04) == (ahead_batch, short, short)  # a short lead: no longer
    assert engine_module.claim_pacing(0.0) == (
        engine_module.CLAIM_BATCH,
        engine_module.MIN_CLAIM_GAP,
        engine_module.MAX_CLAIM_GAP,
    )
    for n in range(400):
        memory.add(f"s-{n:03}", at(1.0 + n * 0.01))  # 100 a second from 1.0 s on
    tick(beat, clock, 0.0)  # the poll claims everything due within the lead
    assert sent_ids(beat) == ["s-000"]
    wake = tick(beat, clock, 0.1)  # held alarms wait for the gap, however often beat wakes
    assert sent_ids(beat) == ["s-000"]
    assert wake == pytest.approx(engine_module.AHEAD_CLAIM_GAP - 0.1)
    tick(beat, clock, engine_module.AHEAD_CLAIM_GAP)
    sent = sent_ids(beat)
    assert sent[-1] == "s-025" and len(sent) == 26  # everything due by 1.25 s: at least 3/4 of the lead ahead
    memory.add("now", at(0.26))  # dispatched for now (announced): it does not wait for the long gap
    beat.heap.push("now", T0 + 0.26)
    assert tick(beat, clock, 0.26) == pytest.approx(engine_module.MAX_CLAIM_GAP - 0.01)
    tick(beat, clock, 0.27)
    assert "now" in sent_ids(beat)


def _drain(beat: AlarmEngine, clock: Clock, seconds: float) -> None:
    """Tick at ``seconds`` until beat waits (a full batch claims again at once)."""
    for _ in range(100):
        if tick(beat, clock, seconds) > 0:
            return
    raise AssertionError("beat kept claiming")


def test_a_burst_is_published_up_to_publish_ahead_max_ahead_and_a_stream_only_publish_ahead(
    beat, memory, clock, settings
):
    settings.CELERY_SCHEDULLER_PUBLISH_AHEAD = 1_000
    settings.CELERY_SCHEDULLER_PUBLISH_AHEAD_MAX = 5_000
    settings.CELERY_SCHEDULLER_BATCH_SIZE = 500
    settings.CELERY_SCHEDULLER_MAX_IN_FLIGHT = 1_000
    for n in range(1_000):
        memory.add(f"s-{n:04}", at(1.0 + n * 0.01))  # 100 a second from 1.0 s to 11 s: a stream
    for n in range(1_500):
        memory.add(f"b-{n:04}", at(9.2 + n * 0.0005))  # 1,500 due between 9.2 and 9.95 s: a burst
    _drain(beat, clock, 0.0)
    assert sent_ids(beat) == ["s-0000"]  # the burst is further than PUBLISH_AHEAD_MAX: the stream's lead
    _drain(beat, clock, 3.0)
    assert len(sent_ids(beat)) == 301 and beat._lead(T0 + 3.0) == 1.0  # due by 4 s; nothing of the burst
    _drain(beat, clock, 5.0)  # the burst's second ends at 10 s, within 5 s: everything due by then goes out
    sent = beat.sender.sent
    burst = [(message_id, eta) for message_id, _attempt, eta in sent if message_id.startswith("b-")]
    assert len(burst) == 1_500 and all(eta == at(9.2 + int(message_id[2:]) * 0.0005) for message_id, eta in burst)
    assert max(message_id for message_id, _a, _e in sent if message_id.startswith("s-")) == "s-0900"  # due at 10 s
    # none of it was due: MAX_IN_FLIGHT (1,000) counts an attempt from its due time, so 2,401 went out
    assert len(sent) == 2_401 and memory.count_in_flight(["tests"], 10_000, at(5.0)) == 401
    assert beat._lead(T0 + 5.5) == pytest.approx(4.5)  # the lead reaches the burst's end until it is past
    _drain(beat, clock, 5.5)
    assert len(sent_ids(beat)) == 2_401


def test_without_publishing_ahead_or_with_a_maximum_not_above_it_a_burst_is_not_published_earlier(
    beat, memory, clock, settings
):
    settings.CELERY_SCHEDULLER_PUBLISH_AHEAD = 1_000
    settings.CELERY_SCHEDULLER_PUBLISH_AHEAD_MAX = 1_000
    for n in range(1_500):
        memory.add(f"b-{n:04}", at(5.0 + n * 0.0005))
    _drain(beat, clock, 0.0)
    _drain(beat, clock, 3.0)
    assert sent_ids(beat) == []
    assert beat._lead(T0 + 3.0) == 1.0
    settings.CELERY_SCHEDULLER_PUBLISH_AHEAD = 0
    settings.CELERY_SCHEDULLER_PUBLISH_AHEAD_MAX = 10_000
    assert beat._lead(T0 + 3.0) == 0.0


def test_the_cap_holds_claims_back_and_the_throttle_looks_again_after_a_pause(beat, memory, clock, settings):
    settings.CELERY_SCHEDULLER_MAX_IN_FLIGHT = 4
    for n in range(6):
        memory.add(f"c-{n}", at(0.0))
    tick(beat, clock, 0.0)
    assert sent_ids(beat) == [f"c-{n}" for n in range(4)]  # the room: 4
    assert beat._throttled
    wake = tick(beat, clock, 0.01)
    assert wake == pytest.approx(engine_module.THROTTLE_PAUSE - 0.01)  # look again after the pause
    counted = sum(call[0] == "count" for call in memory.calls)
    tick(beat, clock, engine_module.THROTTLE_PAUSE)  # no room yet: counted, nothing claimed
    assert sum(call[0] == "count" for call in memory.calls) == counted + 1 and len(sent_ids(beat)) == 4
    for row in list(memory.rows.values())[:2]:  # two answers come back
        memory.finish(_ref(row), _ok(), at(0.1))
    tick(beat, clock, 2 * engine_module.THROTTLE_PAUSE + 0.01)
    assert sent_ids(beat) == [f"c-{n}" for n in range(6)]


def test_far_below_the_cap_claims_do_not_count_until_the_recount(beat, memory, clock, settings):
    settings.CELERY_SCHEDULLER_MAX_IN_FLIGHT = 1_000
    for n in range(30):
        memory.add(f"r-{n:02}", at(n * 0.1))
    tick(beat, clock, 0.0)  # the first claim counts
    counts = lambda: sum(call[0] == "count" for call in memory.calls)  # noqa: E731
    assert counts() == 1
    for step in range(1, 9):  # within ROOM_RECOUNT, with room to spare: no count
        tick(beat, clock, step * 0.1)
    assert counts() == 1 and len(sent_ids(beat)) == 9
    tick(beat, clock, engine_module.ROOM_RECOUNT + 0.05)  # counted again after ROOM_RECOUNT
    assert counts() == 2


def test_publishing_that_falls_behind_gives_the_rest_back(memory, clock, settings):
    settings.CELERY_SCHEDULLER_BATCH_SIZE = 10
    settings.CELERY_SCHEDULLER_MAX_IN_FLIGHT = None
    settings.CELERY_SCHEDULLER_PUBLISH_AHEAD = 0
    sender = RecordingSender(clock, cost=1.0)  # each publish takes a second: 5 s timeouts
    engine = AlarmEngine(
        app=None,  # type: ignore[arg-type]
        names=lambda: ["tests"],
        clock=clock,
        listener=NoListener(),  # type: ignore[arg-type]
        store=memory,
        sender=sender,  # type: ignore[arg-type]
    )
    for n in range(6):
        memory.add(f"slow-{n}", at(0.0), timeout_ms=5_000)
    engine.tick(T0, None)
    # half of the 5 s is gone after three publishes: the other three go back to pending, below the floor
    assert [message_id for message_id, *_ in sender.sent] == ["slow-0", "slow-1", "slow-2"]
    assert [memory.state_of(f"slow-{n}") for n in range(6)] == ["published"] * 3 + ["pending"] * 3
    assert engine._floor is None
    engine.callbacks.close(timeout=0)


def test_one_unreadable_row_fails_alone(beat, memory, clock):
    memory.add("good-1", at(0.0))
    memory.add("bad", at(0.0))
    memory.add("good-2", at(0.0))
    bad = next(row for row in memory.rows.values() if row["message_id"] == "bad")
    bad["raw_request"] = '{"cut": "sho'  # stored JSON that no longer decodes
    tick(beat, clock, 0.0)
    assert sent_ids(beat) == ["good-1", "good-2"]
    assert memory.state_of("bad") == "failed"
    assert "the stored message cannot be read" in json.loads(bad["last_response"])["error"]


def _ref(row: dict[str, Any]) -> Any:
    from celery_scheduller.wire import AttemptRef

    return AttemptRef.of_row(row)


def _ok() -> Any:
    from celery_scheduller import Response

    return Response("ok", value=None)


def test_publishing_ahead_a_stream_is_claimed_in_small_batches_so_workers_take_each_in_a_few_ms():
    from celery_scheduller.planning import claim_gap

    per_claim, shortest, longest = engine_module.claim_pacing(1.0)
    # 100 a second: the last claim took 25 alarms in a quarter second; the next comes after 16 more
    assert claim_gap(25, 0.25, per_claim, shortest, longest) == pytest.approx(0.16)
    # 500 a second: every AHEAD_MIN_GAP (25 alarms), not every quarter second (125)
    assert claim_gap(80, 0.16, per_claim, shortest, longest) == pytest.approx(engine_module.AHEAD_MIN_GAP)
    # one alarm in a quarter second: the longest gap
    assert claim_gap(1, 0.25, per_claim, shortest, longest) == pytest.approx(engine_module.AHEAD_CLAIM_GAP)
