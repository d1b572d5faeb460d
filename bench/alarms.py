"""The Scheduller of the benchmark: every response ends the alarm, as most real ones do."""

from __future__ import annotations

from celery_scheduller import OK, Message, Scheduller


class BenchAlarms(Scheduller):
    name = "bench"

    def service_responded(self, message: Message) -> object:
        return OK
