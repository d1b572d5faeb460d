"""The states of an alarm and the transitions between them.

::

    pending --claim--> published --OK--> (row removed)
       ^                  |  \\--Retry / error back-off--> pending (next attempt, later)
       |                  \\--publish failed (release)--> pending
       \\---- dispatch      published --deadline passed--> timeout handled like a response

Every transition is one conditional UPDATE (or DELETE) in ``store`` naming the state, and for a
published alarm the attempt and deadline, it expects.
"""

from __future__ import annotations

PENDING = "pending"
PUBLISHED = "published"

CHOICES = [(PENDING, "pending"), (PUBLISHED, "published")]

#: For each transition, the states it may start from.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "claim": (PENDING,),
    "release": (PUBLISHED,),
    "finish": (PUBLISHED,),
    "retry": (PUBLISHED,),
    "lease_timeout": (PUBLISHED,),
    "cancel": (PENDING, PUBLISHED),
}
