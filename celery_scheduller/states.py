"""The states of an alarm and the transitions between them.

::

    pending --claim--> published --OK--> finished (or removed, without KEEP_FINISHED)
       ^                  |  \\--Retry / error back-off--> pending (next attempt, later)
       |                  \\--publish failed (release)--> pending
       |               published --deadline passed--> timeout, answered like a response
       |               published --service_responded failed--> published (the response kept; decided
       |                                                        again after a back-off, the task not run)
       |               pending --task unknown at publish--> failed
       |               published --reschedule (held by a worker, due > HANDOVER_MS on)--> pending
       \\---- dispatch / reschedule / restart (of an ended alarm)
    pending, published --cancel--> cancelled (or removed, without KEEP_FINISHED)

Every transition is one conditional statement in ``store`` naming the state, and for a published
alarm the attempt and deadline, it expects.
"""

from __future__ import annotations

PENDING = "pending"
PUBLISHED = "published"
FINISHED = "finished"
FAILED = "failed"
CANCELLED = "cancelled"

CHOICES = [
    (PENDING, "pending"),
    (PUBLISHED, "published"),
    (FINISHED, "finished"),
    (FAILED, "failed"),
    (CANCELLED, "cancelled"),
]

#: How close to its due time an alarm published ahead (held by a worker until then) may still be moved by
#: ``reschedule``, in ms: closer, the worker may be starting it, and ``reschedule`` returns False.
HANDOVER_MS = 100

#: States of an alarm still on the schedule.
ACTIVE: tuple[str, ...] = (PENDING, PUBLISHED)
#: States of an alarm kept as history after it ended.
ENDED: tuple[str, ...] = (FINISHED, FAILED, CANCELLED)

#: For each transition, the states it may start from.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "claim": (PENDING,),
    "release": (PUBLISHED,),
    "finish": (PUBLISHED,),
    "retry": (PUBLISHED,),
    "lease_timeout": (PUBLISHED,),
    "redecide": (PUBLISHED,),
    "fail": (PUBLISHED,),
    "cancel": ACTIVE,
    "reschedule": ACTIVE,
    "restart": ENDED,
    "prune": ENDED,
}

#: For each transition, the state it ends in (None: the row is removed).
TARGETS: dict[str, str | None] = {
    "claim": PUBLISHED,
    "release": PENDING,
    "finish": FINISHED,
    "retry": PENDING,
    "lease_timeout": PUBLISHED,
    "redecide": PUBLISHED,
    "fail": FAILED,
    "cancel": CANCELLED,
    "reschedule": PENDING,
    "restart": PENDING,
    "prune": None,
}
