"""Window arithmetic, the due heap and the next wake-up, with ``now`` passed in."""

from __future__ import annotations

import pytest

from celery_scheduller.planning import DueHeap, Window, claim_gap, next_wakeup


def test_first_load_covers_everything_up_to_two_intervals_ahead():
    window = Window(interval=60)
    assert window.load_due(1000.0)
    assert window.next_load(1000.0) == (None, 1120.0)


def test_each_load_starts_where_the_previous_ended_and_stays_two_intervals_ahead():
    window = Window(interval=60)
    _, until = window.next_load(1000.0)
    window.loaded(until, 1000.0)
    assert not window.load_due(1059.9)
    assert window.load_due(1060.0)
    assert window.next_load(1060.0) == (1120.0, 1180.0)
    # a late tick does not leave a gap: the slice still starts at the previous end
    window.loaded(1180.0, 1060.0)
    assert window.next_load(1135.0) == (1180.0, 1255.0)


def test_loads_do_not_drift_ahead_of_the_clock():
    window = Window(interval=10)
    now = 0.0
    for _ in range(100):
        _, until = window.next_load(now)
        window.loaded(until, now)
        now = window.next_load_at
    assert window.loaded_until == pytest.approx(now - 10 + 20)


def test_window_never_shrinks_when_the_clock_steps_back():
    window = Window(interval=10)
    window.loaded(500.0, 480.0)
    assert window.next_load(400.0) == (500.0, 500.0)


def test_heap_ignores_an_id_already_held_and_pops_due_ids_in_order():
    heap = DueHeap()
    assert heap.push("b", 20.0)
    assert heap.push("a", 10.0)
    assert not heap.push("a", 5.0)  # already held: ignored, keeps its time
    assert heap.push("c", 30.0)
    assert len(heap) == 3 and "a" in heap
    assert heap.next_due() == 10.0
    assert heap.pop_due(9.9) == []
    assert heap.pop_due(20.0) == ["a", "b"]
    assert "a" not in heap and len(heap) == 1
    assert heap.push("a", 40.0)  # once released it may be held again (a later attempt)
    assert heap.pop_due(100.0) == ["c", "a"]
    assert heap.next_due() is None


def test_next_wakeup_is_the_earliest_moment_never_negative():
    assert next_wakeup(100.0, None, 100.5, 102.0) == pytest.approx(0.5)
    assert next_wakeup(100.0, 99.0, 101.0) == 0.0
    with pytest.raises(ValueError, match="at least one moment"):
        next_wakeup(100.0, None)


def test_claims_come_as_often_as_the_stream_brings_a_batch_within_their_bounds():
    # 1,000/s claimed every 20 ms brought 20: claim every 10 ms, about 10 at a time
    assert claim_gap(20, 0.02, 10, 0.005, 0.02) == pytest.approx(0.01)
    assert claim_gap(10, 0.01, 10, 0.005, 0.02) == pytest.approx(0.01)  # and it stays there
    assert claim_gap(100, 0.02, 10, 0.005, 0.02) == 0.005  # 5,000/s: never closer than the shortest
    assert claim_gap(5, 0.02, 10, 0.005, 0.02) == 0.02  # 250/s: never further apart than the longest
    assert claim_gap(1, float("inf"), 10, 0.005, 0.02) == 0.02  # the first claim
    assert claim_gap(0, 0.02, 10, 0.005, 0.02) == 0.02  # nothing was due (another beat took it)
