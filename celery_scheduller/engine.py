"""Beat's alarm loop: load windows, claim what is due, publish it, answer overdue attempts.

``AlarmEngine.tick(now, producer)`` is one pass; it reads no clock itself. The beat shell
(``schedulers.AlarmScheduler``) reads the clock once per tick and handles errors around it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from celery import Celery

from . import activity, callbacks, observe, pruning, registry, signals, tracing, writer
from . import listener as listener_module
from . import store as store_module
from .clock import to_datetime
from .conf import settings
from .exceptions import ConfigurationError, PublishFailed, SchedullerError
from .message import Message, Response, describe
from .planning import BURST, DueHeap, Window, claim_gap, next_wakeup
from .scheduller import Scheduller
from .sender import TaskSender
from .store import Store
from .wire import AttemptRef, header_of

logger = logging.getLogger("celery_scheduller")


#: Seconds between reads of the LISTEN connection, where beat cannot sleep on it (``Engine.listens_while_idle``
#: False): how soon an alarm dispatched already due is noticed. Beat's loop (``AlarmScheduler``) sleeps on the
#: connection instead, woken by the announcement itself.
LISTEN_INTERVAL = 0.1
#: Seconds between two claims of held alarms (``planning.claim_gap``): a stream of due times is claimed in
#: batches of about CLAIM_BATCH alarms, at most every MAX_CLAIM_GAP and at least MIN_CLAIM_GAP apart.
MAX_CLAIM_GAP = 0.02
MIN_CLAIM_GAP = 0.005
#: Publishing ahead, a claim takes everything due within the lead, so claims can be further apart: at most a
#: quarter of the lead and AHEAD_CLAIM_GAP (each alarm still goes out at least 3/4 of the lead ahead), at
#: least AHEAD_MIN_GAP, in batches of about AHEAD_CLAIM_BATCH between the two. Beat's fixed cost per claim is
#: spread over many alarms at low rates too, and a worker takes each batch in (a burst of messages its event
#: loop handles in one go: on RabbitMQ about a millisecond per task, the held alarms due meanwhile wait) in a
#: few ms, not tens. An alarm due sooner than half the lead (dispatched for now, a quick retry) is claimed
#: within MAX_CLAIM_GAP.
AHEAD_CLAIM_GAP = 0.25
AHEAD_MIN_GAP = 0.05
AHEAD_CLAIM_BATCH = 16
CLAIM_BATCH = 10
#: Seconds between looks at the number in flight while MAX_IN_FLIGHT holds claims back.
THROTTLE_PAUSE = 0.05
#: Counting the attempts in flight reads one index entry per attempt, so beat does not count before every
#: claim when far below MAX_IN_FLIGHT: while the room it last counted,
#: less what it claimed since, leaves at least ROOM_SPARE of the cap beside the next claim, it claims
#: without counting, and counts again at least every ROOM_RECOUNT seconds. Answers only add room; what
#: other beats claim meanwhile is the one thing the estimate misses, and they would have to claim a
#: quarter of the cap within a second to take it past the cap.
ROOM_SPARE = 0.25
ROOM_RECOUNT = 1.0
#: Every claimed alarm leaves its pending version's index entry behind until VACUUM, where a claim's
#: range starts. So only the poll claims from the beginning; between polls claims start at beat's floor:
#: the time up to which its last claim took everything due (the end of its range, or the last row of a
#: full one) less FLOOR_MARGIN seconds. An alarm beat holds (loaded, or announced by ``dispatch``,
#: ``reschedule`` or ``restart``) lowers the floor to its due time when it comes due; any other pending
#: row below it (a retry a worker wrote, an attempt another beat released) is the poll's, as it always
#: was. Releasing claims of its own starts beat from the beginning again.
FLOOR_MARGIN = 1.0


def claim_pacing(ahead: float) -> tuple[int, float, float]:
    """How many alarms a claim of held alarms aims at, and the shortest and longest gaps between claims, for
    a lead of ``ahead`` seconds (``AHEAD_CLAIM_GAP``)."""
    if ahead <= 0:
        return CLAIM_BATCH, MIN_CLAIM_GAP, MAX_CLAIM_GAP
    longest = max(MAX_CLAIM_GAP, min(ahead / 4, AHEAD_CLAIM_GAP))
    return AHEAD_CLAIM_BATCH, min(AHEAD_MIN_GAP, longest), longest


def _check_header_size(headers: dict[str, str], limit: int | None) -> None:
    if limit is not None:
        size = sum(len(value) for value in headers.values())
        if size > limit:
            raise SchedullerError(
                f"its header (ids and assigns) is {size} bytes, more than the broker takes in one header "
                f"({limit} bytes within its frame_max)"
            )


def _half_spent(ref: AttemptRef, timeout_ms: int) -> float:
    """When half of an attempt's response time is gone (epoch seconds)."""
    return ref.deadline.timestamp() - timeout_ms / 2000


class AlarmEngine:
    """The alarm side of one beat process: the loaded windows and the heap of due times."""

    def __init__(
        self,
        app: Celery,
        names: Callable[[], Sequence[str]] = registry.names,
        name: str | None = None,
        clock: Callable[[], float] | None = None,
        listener: listener_module.Listener | None = None,
        store: Store | None = None,
        sender: TaskSender | None = None,
        pruner: pruning.Pruner | None = None,
    ) -> None:
        self.app = app
        self.listener = listener or listener_module.Listener()
        #: set by a loop that sleeps on ``listener.wait`` between ticks: no wakeups just to read it
        self.listens_while_idle = False
        self._names = names
        # read while publishing a batch, to stop before the rest of it would go out half expired
        self._clock = clock or time.time
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.heap = DueHeap()
        self.windows: dict[str, Window] = {}
        self.next_poll_at = float("-inf")
        self.next_record_at = float("-inf")
        self.next_prune_at = float("-inf")
        self.started_at: float | None = None
        self.published = 0
        self.timeouts = 0
        self.store: Store = store or store_module.default
        self.sender = sender or TaskSender(app)
        self.callbacks = callbacks.CallbackRunner()
        self.pruner = pruner or pruning.Pruner(self.store, registry.serves_django_tasks)
        self._backlog = False
        self._claimed_at = float("-inf")
        self._claim_gap = MAX_CLAIM_GAP
        self._throttled = False
        # the room under MAX_IN_FLIGHT as last counted (for that cap), less what this beat claimed since
        self._room: tuple[int, int, float] | None = None  # (cap, room, counted at)
        self._floor: dt.datetime | None = None  # claims between polls start here (None: the beginning)
        self._burst_until = float("-inf")  # a burst found in the heap: published ahead up to here (``_lead``)
        self._expected: list[str] = []  # ids of held alarms that came due for this tick's claim

    def tick(self, now: float, producer: Any) -> float:
        """One pass at ``now`` (epoch seconds); returns the seconds until the next pass is needed."""
        observe.ticked(now)
        names = self._names()
        if not names:
            return settings.integer("POLL_INTERVAL") / 1000
        for name in names:
            self._load_window(name, now)
        self._hold_announced(names)
        ahead = self._lead(now)
        polling = now >= self.next_poll_at
        more = False
        # a full batch last time means more is due now: claim again without waiting for the poll;
        # held back by MAX_IN_FLIGHT, look again after a short pause, not as held alarms come due (the
        # claim after the pause takes them: each look counts every attempt in flight)
        waited = self._throttled and now >= self._claimed_at + THROTTLE_PAUSE
        earliest = self.heap.next_due()  # of what pops now, if anything does
        next_claim = self._next_claim(ahead)
        # publishing ahead, held alarms wait for their claim's time (the pacing above); else any tick takes them
        claiming = ahead <= 0 or (next_claim is not None and now >= next_claim)
        popped_ids = self.heap.pop_due(now + ahead) if claiming else []
        popped = bool(popped_ids)
        self._expected = [alarm_id for alarm_id in popped_ids if not alarm_id.startswith("announced ")]
        if popped and earliest is not None:
            self._lower_floor(to_datetime(earliest))
        if (popped and not self._throttled) or polling or self._backlog or waited:
            more = self._backlog = self._publish_due(names, to_datetime(now), producer, ahead, polling)
            self._claimed_at = now
        if polling:
            self.callbacks.watch(to_datetime(now))
            more = self._answer_timeouts(names, to_datetime(now)) or more
            self.next_poll_at = now + settings.integer("POLL_INTERVAL") / 1000
        if now >= self.next_record_at:
            self._record(now)
        if now >= self.next_prune_at:
            self._prune(now)
        if more:
            return 0.0
        return next_wakeup(
            now,
            now + LISTEN_INTERVAL if self.listener.available and not self.listens_while_idle else None,
            self._claimed_at + THROTTLE_PAUSE if self._throttled else self._next_claim(ahead),
            self.next_poll_at,
            self.next_record_at,
            self.next_prune_at,
            *(window.next_load_at for window in self.windows.values()),
        )

    def close(self) -> None:
        """Release the LISTEN connection; let the callbacks under way finish and their answers be stored."""
        self.listener.close()
        self.pruner.close()
        self.callbacks.close()
        writer.default.stop()
        activity.default.flush_at_exit()

    def _lead(self, now: float) -> float:
        """How far ahead of their due time alarms are claimed now (seconds): PUBLISH_AHEAD, or up to
        PUBLISH_AHEAD_MAX to the end of a burst (``planning.BURST``) the heap holds, kept until that burst's
        end (its claims take it batch by batch after the heap let it go)."""
        base = settings.publish_ahead() / 1000
        longest = settings.publish_ahead_max() / 1000
        if base <= 0 or longest <= base:
            return base
        ends = self.heap.burst_ends(now + base, now + longest)
        if ends is not None and ends > self._burst_until:
            self._burst_until = ends
            logger.info(
                "%s alarms or more due within one second at %s: published up to %.1f s ahead",
                BURST,
                to_datetime(ends - 1).isoformat(),
                min(longest, ends - now),
                extra={"action": "burst_ahead"},
            )
        return max(base, min(longest, self._burst_until - now))

    def _next_claim(self, ahead: float) -> float | None:
        """When the next held alarm is to be published (``ahead`` seconds before it is due), claims at
        most every ``_claim_gap`` so a stream of due times is published in batches rather than one claim
        per alarm."""
        due = self.heap.next_due()
        if due is None:
            return None
        at = max(due - ahead, self._claimed_at + self._claim_gap)
        if ahead > 0 and at > due - ahead / 2:  # the long gap would leave it less than half the lead
            at = max(due - ahead, self._claimed_at + min(self._claim_gap, MAX_CLAIM_GAP))
        return at

    def _hold_announced(self, names: Sequence[str]) -> None:
        """Hold alarms dispatched (by any process) into windows already loaded, as their owners announced.

        An announcement spanning at most ``MAX_CLAIM_GAP`` (a ``dispatch``, or a ``dispatch_many`` of
        nearby due times) is held as its two ends, without reading the table: the claims at those times
        take whatever is due. Wider ones are read, one range per Scheduller, unless it loads its own.
        """
        ranges: dict[str, tuple[float, float]] = {}
        for name, earliest, latest in self.listener.due():
            window = self.windows.get(name)
            if name not in names or window is None or window.loaded_until is None or earliest > window.loaded_until:
                continue  # a later window load reads them
            until = min(latest, window.loaded_until)
            if until - earliest > MAX_CLAIM_GAP and type(registry.get(name)).load_alarms is Scheduller.load_alarms:
                low, high = ranges.get(name, (earliest, until))
                ranges[name] = (min(low, earliest), max(high, until))
            else:
                self.heap.push(f"announced {earliest!r}", earliest)
                self.heap.push(f"announced {until!r}", until)
        for name, (earliest, until) in ranges.items():
            for message_id, due in self.store.due_times_between(name, to_datetime(earliest - 1e-6), to_datetime(until)):
                self.heap.push(message_id, due.timestamp())

    def _record(self, now: float) -> None:
        """Tell ``scheduller_status`` this beat is alive and what it holds."""
        if self.started_at is None:
            self.started_at = now
        windows = {
            name: to_datetime(window.loaded_until).isoformat()
            for name, window in self.windows.items()
            if window.loaded_until is not None
        }
        self.store.record_beat(
            self.name, to_datetime(self.started_at), to_datetime(now), windows, self.published, self.timeouts
        )
        self.next_record_at = now + settings.integer("BEAT_RECORD_INTERVAL") / 1000

    def _prune(self, now: float) -> None:
        """Ask for a pruning pass (``pruning``): it removes what ended before KEEP_FINISHED ago, batch after
        batch until caught up, beside this loop where the database allows."""
        self.next_prune_at = now + settings.integer("PRUNE_INTERVAL") / 1000
        self.pruner.due(now)

    def _load_window(self, name: str, now: float) -> None:
        window = self.windows.get(name)
        scheduller = registry.get(name)
        if window is None:
            interval = scheduller.in_memory_interval()
            if isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0:
                raise ConfigurationError(
                    f"{name}.in_memory_interval() must return a positive integer (ms), got {interval!r}"
                )
            window = self.windows[name] = Window(interval / 1000)
        if not window.load_due(now):
            return
        load_from, load_until = window.next_load(now)
        started = time.perf_counter()
        start, until = None if load_from is None else to_datetime(load_from), to_datetime(load_until)
        if type(scheduller).load_alarms is Scheduller.load_alarms:
            # the default loader: the heap needs ids and due times only, not whole Messages
            due_times: Iterable[tuple[str, dt.datetime | None]] = self.store.due_times_between(name, start, until)
        else:
            due_times = ((message.id, message.dispatch_at) for message in scheduller.load_alarms(start, until))
        held = 0
        for message_id, due in due_times:
            if due is not None and self.heap.push(message_id, due.timestamp()):
                held += 1
        window.loaded(load_until, now)
        observe.window_loaded(name, time.perf_counter() - started)
        logger.info(
            "loaded %s alarms of %s due until %s in %.3f s (%s held)",
            held,
            name,
            to_datetime(load_until).isoformat(),
            time.perf_counter() - started,
            len(self.heap),
            extra={"action": "loaded", "scheduller": name},
        )

    def _publish_due(
        self, names: Sequence[str], now: dt.datetime, producer: Any, ahead: float, from_start: bool = True
    ) -> bool:
        """Claim one batch of alarms due within ``ahead`` seconds (``from_start``: of all, else from the
        floor) and publish it; True when the batch was full. One not yet due goes out with its due time
        as the task's ``eta``."""
        until = now + dt.timedelta(seconds=ahead)
        since = None if from_start else self._floor
        limit = settings.integer("BATCH_SIZE")
        started = time.perf_counter()
        self._throttled = False
        per_claim, shortest, longest = claim_pacing(ahead)
        self._claim_gap = longest  # nothing claimed: as for a slow stream
        cap = settings.max_in_flight()
        capped = False
        if cap is None:
            rows = self.store.claim_due(names, now, limit, until, since)
        elif self._room_to_spare(cap, limit, now.timestamp()):
            rows = self.store.claim_due(names, now, limit, until, since)
            self._took_room(len(rows))
        else:
            room, rows = self.store.claim_due_within(names, now, limit, cap, until, since)
            self._room = (cap, room - len(rows), now.timestamp())
            if room <= 0:
                self._throttled = True
                return False
            capped, limit = room < limit, min(limit, room)
        # everything due before the last row of a full claim, or by ``until``, was taken (or is locked
        # by another beat, which publishes or releases it)
        taken_until = rows[-1]["dispatch_at"] if rows and len(rows) >= limit else until
        self._floor = taken_until - dt.timedelta(seconds=FLOOR_MARGIN)
        elapsed = now.timestamp() - self._claimed_at
        self._claim_gap = claim_gap(len(rows), elapsed, per_claim, shortest, longest)
        self._count_claim(rows, limit)
        if not rows:
            return False
        claimed = time.perf_counter()
        late_before = now - dt.timedelta(milliseconds=settings.LATE_AFTER)
        outgoing: list[tuple[AttemptRef, Message, int, dt.datetime | None]] = []
        for row in rows:
            ref = AttemptRef.of_row(row)
            try:  # a row this process cannot read fails alone; its batch-mates go out
                if row.get("unreadable"):
                    raise ValueError(row["unreadable"])
                message = self.store.message_from_row(row)
            except (ValueError, TypeError, KeyError, RecursionError) as exc:
                self._fail(ref, row["message_id"], f"the stored message cannot be read: {describe(exc)}", now)
                continue
            if row["dispatch_at"] < late_before:
                message = message.assign("late", True)
            # A task beat does not know is published all the same: workers may know it (a deploy beat
            # has not seen); one that no worker knows comes back as an error response (``hooks``).
            eta = row["dispatch_at"] if row["dispatch_at"] > now else None
            outgoing.append((ref, message, row["timeout_ms"], eta))
        sent = self._publish(outgoing, now, producer)
        self.published += len(sent)
        published_at = self._clock()
        for ref, message in sent:
            due = message.assigns.get("dispatch_at")
            lateness = published_at - due.timestamp() if isinstance(due, dt.datetime) else 0.0
            observe.published(ref.scheduller, message.service_name, lateness)
            signals.send(signals.alarm_published, ref.scheduller, message=message, attempt=ref.attempt)
        if logger.isEnabledFor(logging.DEBUG):
            for ref, message in sent:
                logger.debug(
                    "published alarm %s attempt %s",
                    message.id,
                    ref.attempt,
                    extra={"alarm_id": message.id, "attempt": ref.attempt, "action": "published"},
                )
        logger.info(
            "published %s alarms (claim %.3f s, publish %.3f s)",
            len(sent),
            claimed - started,
            time.perf_counter() - claimed,
            extra={"action": "published", "count": len(sent)},
        )
        if capped and len(rows) == limit:
            self._throttled = True  # more may be due: wait for answers before the next claim
            return False
        return len(rows) == limit

    def _count_claim(self, rows: Sequence[dict[str, Any]], limit: int) -> None:
        """Tell the metrics how many alarms this claim took, and how many of those this beat held as due it
        did not get (a full claim leaves the rest for the next one: none counted)."""
        expected, self._expected = self._expected, []
        conflicts = 0
        if expected and len(rows) < limit:
            claimed = {row["message_id"] for row in rows}
            conflicts = sum(1 for alarm_id in expected if alarm_id not in claimed)
        observe.claimed(len(rows), conflicts)

    def _room_to_spare(self, cap: int, limit: int, now: float) -> bool:
        """Whether a claim of ``limit`` leaves ROOM_SPARE of ``cap`` free by the last count (``ROOM_RECOUNT``)."""
        if self._room is None:
            return False
        counted_cap, room, counted_at = self._room
        return counted_cap == cap and now - counted_at < ROOM_RECOUNT and room - limit >= cap * ROOM_SPARE

    def _lower_floor(self, due: dt.datetime) -> None:
        """An alarm beat holds came due at ``due``: the next claim starts no later than that."""
        if self._floor is not None:
            self._floor = min(self._floor, due - dt.timedelta(seconds=FLOOR_MARGIN))

    def _took_room(self, claimed: int) -> None:
        if self._room is not None:
            cap, room, counted_at = self._room
            self._room = (cap, room - claimed, counted_at)

    def _publish(
        self,
        outgoing: list[tuple[AttemptRef, Message, int, dt.datetime | None]],
        now: dt.datetime,
        producer: Any,
    ) -> list[tuple[AttemptRef, Message]]:
        """Publish claimed attempts in one broker batch where the transport has one; returns those sent.

        A batch goes out when the block ends, so a broker error releases every attempt of it (some may
        have reached the broker: their late responses are ignored, as for any superseded attempt).
        """
        sent: list[tuple[AttemptRef, Message]] = []
        with self.sender.open(producer) as producer:
            limit = self.sender.header_limit(producer)
            try:
                with self.sender.batch(producer, len(outgoing)):
                    for index, (ref, message, timeout_ms, eta) in enumerate(outgoing):
                        if self._clock() >= _half_spent(ref, timeout_ms):
                            # Publishing fell behind: the rest would reach workers close to (or past) its
                            # deadline and expire unrun. Give it back; the next claim sets a fresh deadline.
                            behind = [ref for ref, *_rest in outgoing[index:]]
                            self._floor = None  # pending again, below the floor
                            self.store.release(behind, now)
                            logger.warning(
                                "publishing fell behind: released %s claimed alarms",
                                len(behind),
                                extra={"action": "released", "count": len(behind)},
                            )
                            break
                        try:  # what only this alarm can get wrong: its header, its size
                            headers = header_of(ref, message)
                            _check_header_size(headers, limit)
                        except (SchedullerError, ValueError, TypeError, RecursionError) as exc:
                            self._fail(ref, message.id, f"cannot be published: {describe(exc)}", now, message)
                            continue
                        with tracing.publishing(ref.scheduller, ref.attempt, message, headers):
                            self.sender.send_attempt(producer, ref, message, eta, headers)
                        sent.append((ref, message))
            except Exception as exc:
                unsent = [ref for ref, *_rest in outgoing]  # guarded: those failed meanwhile stay failed
                self._floor = None  # pending again, below the floor
                self.store.release(unsent, now)
                raise PublishFailed(f"publishing {len(outgoing)} alarms failed; released {len(unsent)} claims") from exc
        return sent

    def _fail(
        self, ref: AttemptRef, message_id: str, reason: str, now: dt.datetime, message: Message | None = None
    ) -> None:
        """Fail one claimed alarm that cannot be published, visibly, with ``reason``; its batch goes on."""
        if self.store.fail(ref, reason, now):
            observe.decided(ref.scheduller, "failed")
            logger.error("alarm %s failed: %s", message_id, reason, extra={"alarm_id": message_id, "action": "failed"})
            signals.send(signals.alarm_failed, ref.scheduller, message=message, attempt=ref.attempt, reason=reason)

    def _answer_timeouts(self, names: Sequence[str], now: dt.datetime) -> bool:
        """Answer attempts whose deadline passed with a ``timeout`` response; True when more may wait."""
        limit = settings.integer("BATCH_SIZE")
        lease_until = now + dt.timedelta(milliseconds=settings.integer("TIMEOUT_LEASE"))
        # no more leased than the callback runner can answer within the lease
        limit = min(limit, max(0, 2 * limit - self.callbacks.busy()))
        if limit == 0:
            return False
        leased = self.store.lease_timeouts(names, now, lease_until, limit)
        for ref, message in leased:
            # an attempt whose service_responded failed is decided again with the response it kept; any
            # other is a timeout
            self.callbacks.submit(ref, message, message.response or Response("timeout"), now)
        self.timeouts += len(leased)
        return len(leased) == limit
