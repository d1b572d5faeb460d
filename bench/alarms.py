"""The Scheduller of the benchmark: a run ends the alarm; a missing response delivers it again at once."""

from __future__ import annotations

from celery_scheduller import OK, Message, Retry, Scheduller


class BenchAlarms(Scheduller):
    name = "bench"

    def service_responded(self, message: Message) -> object:
        if message.response is not None and message.response.status == "timeout":
            return Retry(0)
        return OK

    def dispatch_timeout(self, message: Message) -> int:
        # The workloads go past what one worker process runs per second here: a queue of a few seconds
        # is a backlog, not a lost attempt. The seed's 5 s default would turn it into redeliveries.
        return 30_000


class SoakAlarms(Scheduller):
    """The soak's Scheduller (``bench/soak.py``): an error is retried once a second later, a missing response
    at once; anything else ends the alarm."""

    name = "soak"

    def service_responded(self, message: Message) -> object:
        response = message.response
        if response is not None and response.status == "error":
            return Retry(1_000, message)
        if response is not None and response.status == "timeout":
            return Retry(0)
        return OK

    def dispatch_timeout(self, message: Message) -> int:
        return 30_000
