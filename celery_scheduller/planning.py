"""Pure planning logic of beat: load windows and the heap of due times. Time is always an argument."""

from __future__ import annotations

import dataclasses
import heapq


@dataclasses.dataclass
class Window:
    """The slice of time one Scheduller's alarms are loaded for.

    Every ``interval`` seconds the next load covers up to ``now + 2 × interval``; it starts where the
    previous one ended, so each alarm is loaded once and ``loaded_until`` stays ``2 × interval`` ahead
    of the clock instead of drifting away from it.
    """

    interval: float
    loaded_until: float | None = None
    next_load_at: float = float("-inf")

    def load_due(self, now: float) -> bool:
        """True when it is time for the next load."""
        return now >= self.next_load_at

    def next_load(self, now: float) -> tuple[float | None, float]:
        """The ``(load_from, load_until)`` of the load made at ``now`` (``load_from`` None on start)."""
        until = now + 2 * self.interval
        if self.loaded_until is not None:
            until = max(until, self.loaded_until)
        return self.loaded_until, until

    def loaded(self, until: float, now: float) -> None:
        """Record a load that succeeded at ``now`` up to ``until``."""
        self.loaded_until = until
        self.next_load_at = now + self.interval


#: More alarms than this due within one second make a burst: beat publishes it ahead by up to
#: PUBLISH_AHEAD_MAX rather than PUBLISH_AHEAD (``DueHeap.burst_ends``). About what one worker process takes
#: in from the broker in a second here; a steadier stream is published PUBLISH_AHEAD ahead.
BURST = 1_000


class DueHeap:
    """Alarm ids by due time, each id held once: the in-memory window, with a count per second of due time
    (``burst_ends``)."""

    def __init__(self) -> None:
        self._entries: list[tuple[float, str]] = []
        self._held: dict[str, float] = {}
        self._per_second: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, alarm_id: object) -> bool:
        return alarm_id in self._held

    def push(self, alarm_id: str, due: float) -> bool:
        """Hold ``alarm_id`` due at ``due``; False (and nothing changes) when it is already held."""
        if alarm_id in self._held:
            return False
        self._held[alarm_id] = due
        heapq.heappush(self._entries, (due, alarm_id))
        second = int(due)
        self._per_second[second] = self._per_second.get(second, 0) + 1
        return True

    def pop_due(self, now: float) -> list[str]:
        """Remove and return every held id due at or before ``now``, earliest first."""
        due: list[str] = []
        entries = self._entries
        per_second = self._per_second
        while entries and entries[0][0] <= now:
            at, alarm_id = heapq.heappop(entries)
            second = int(at)
            left = per_second[second] - 1
            if left:
                per_second[second] = left
            else:
                del per_second[second]
            if self._held.pop(alarm_id, None) is not None:
                due.append(alarm_id)
        return due

    def burst_ends(self, after: float, until: float, burst: int = BURST) -> float | None:
        """The end of the first second (of due time) from ``after`` to ``until`` in which more than ``burst``
        held alarms are due, or None: where beat's lead stretches to (``PUBLISH_AHEAD_MAX``)."""
        per_second = self._per_second
        for second in range(int(after), int(until) + 1):
            if per_second.get(second, 0) > burst:
                return float(second + 1)
        return None

    def next_due(self) -> float | None:
        """The earliest due time held, or None when empty."""
        return self._entries[0][0] if self._entries else None


def next_wakeup(now: float, *moments: float | None) -> float:
    """Seconds from ``now`` until the earliest of ``moments`` (never negative); ignores None."""
    upcoming = [moment for moment in moments if moment is not None]
    if not upcoming:
        raise ValueError("next_wakeup needs at least one moment")
    return max(0.0, min(upcoming) - now)


def claim_gap(claimed: int, elapsed: float, per_claim: int, shortest: float, longest: float) -> float:
    """Seconds to wait before the next claim of held alarms, after one that took ``claimed`` alarms
    ``elapsed`` seconds after the one before.

    Claims batch a stream of due times: the gap is the time the stream took to bring ``per_claim``
    alarms, between ``shortest`` and ``longest``. A fast stream is claimed more often in batches of
    about ``per_claim`` (less waiting before publish, smoother work for the workers); a slow one at most
    every ``longest``, so beat's cost per alarm stays bounded."""
    if claimed <= 0 or elapsed <= 0:
        return longest
    return min(longest, max(shortest, elapsed * per_claim / claimed))
