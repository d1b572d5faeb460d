"""celery_scheduller's pytest plugin (registered through the ``pytest11`` entry point when the package is
installed): the ``alarm_kit`` fixture. Imports nothing of Django until a test asks for it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def alarm_kit(db: None) -> Iterator[Any]:
    """A started ``celery_scheduller.testing.AlarmKit``: alarms due by a clock the test controls, delivered
    in the test's process by ``run_due`` / ``drain``. Gives the test database access (pytest-django's ``db``;
    a test that also asks for ``transactional_db``, or is marked ``django_db(transaction=True)``, gets that)."""
    from celery_scheduller.testing import AlarmKit

    with AlarmKit() as kit:
        yield kit
