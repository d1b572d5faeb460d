"""Schedullers used by the tests. Their decisions are steered by the message's assigns."""

from __future__ import annotations

from typing import Any

from celery_scheduller import OK, Fail, Message, Retry, Scheduller
from celery_scheduller.message import to_json_value

from .models import Answer


class TestAlarms(Scheduller):
    """Retries while ``assigns["retries_left"]`` > 0 (``assigns["retry_ms"]`` later; with
    ``assigns["retry_errors_only"]`` only an error or timeout is retried), then says OK, or
    ``Fail(assigns["fail_reason"])`` when one is given.

    On a retry the message's ``raw_request`` gains ``try`` (the try number), so tests see the
    modified message arrive at the task.
    """

    name = "tests"
    __test__ = False  # a Scheduller, not a pytest class

    def service_responded(self, message: Message) -> Any:
        left = message.assigns.get("retries_left", 0)
        response = message.response
        assert response is not None
        decision: Any = OK
        if left > 0 and not (message.assigns.get("retry_errors_only") and response.status == "ok"):
            tries = message.assigns.get("tries", 0) + 1
            modified = Message.new(
                message.service_name,
                {**message.raw_request, "try": tries},
                id=message.id,
                assigns={
                    **message.assigns,
                    "retries_left": left - 1,
                    "tries": tries,
                    "timeout_ms": message.assigns.get("retry_timeout_ms", message.assigns.get("timeout_ms", 5_000)),
                },
            )
            decision = Retry(message.assigns.get("retry_ms", 100), modified)
        elif message.assigns.get("fail_reason"):  # the last try: give up visibly
            decision = Fail(message.assigns["fail_reason"])
        Answer.objects.create(
            message_id=message.id,
            status=response.status,
            value=to_json_value(response.value) if response.ok else None,
            error=response.error,
            assigns=to_json_value(message.assigns),
            decision="ok" if decision is OK else "fail" if isinstance(decision, Fail) else f"retry {decision.in_ms}",
        )
        return decision

    def dispatch_timeout(self, message: Message) -> int:
        return int(message.assigns.get("timeout_ms", 5_000))

    def in_memory_interval(self) -> int:
        return int((self.state or {}).get("interval_ms", 60_000))


class BrokenAlarms(Scheduller):
    """``service_responded`` raises the first time, then returns garbage, then a Retry past year 9999, then OK."""

    name = "broken"

    def service_responded(self, message: Message) -> Any:
        count = Answer.objects.filter(message_id=message.id).count()
        Answer.objects.create(
            message_id=message.id, status=message.response.status if message.response else "", decision=str(count)
        )
        if count == 0:
            raise RuntimeError("service_responded blew up")
        if count == 1:
            return "garbage"
        if count == 2:
            return Retry(10**15)  # 31,700 years
        return OK


class UnlistedAlarms(Scheduller):
    """Not in CELERY_SCHEDULLER_CLASSES."""

    def service_responded(self, message: Message) -> Any:
        return OK


class SameNameAlarms(Scheduller):
    """Shares TestAlarms' name: the system check must refuse the pair."""

    name = "tests"

    def service_responded(self, message: Message) -> Any:
        return OK


class FaultAlarms(Scheduller):
    """The fault suite's Scheduller: retries every failed or unanswered attempt after 300 ms (without
    the ``hang`` flag, so a hung first attempt is followed by one that finishes) until it succeeds."""

    name = "faults"

    def service_responded(self, message: Message) -> Any:
        if message.response is not None and message.response.ok:
            return OK
        request = {k: v for k, v in message.raw_request.items() if k != "hang"}
        return Retry(300, Message.new(message.service_name, request, id=message.id, assigns=message.assigns))

    def dispatch_timeout(self, message: Message) -> int:
        return 4_000


class AuditedAlarms(TestAlarms):
    """Overrides ``save_alarm`` as the contract allows: records each call, refuses aggregate ``"refused"``
    before storing, and stores the rest through ``super().save_alarm``."""

    name = "audited"
    saved: list[tuple[str, str, Any]] = []

    def save_alarm(self, message: Message, aggregate_id: str) -> None:
        if aggregate_id == "refused":
            raise ValueError(f"aggregate {aggregate_id!r} may not schedule alarms")
        type(self).saved.append((message.id, aggregate_id, message.assigns.get("dispatch_at")))
        super().save_alarm(message, aggregate_id)


class PoisonAlarms(Scheduller):
    """The poison suite's Scheduller: ``assigns["poison"]`` says how its ``service_responded`` misbehaves.

    - ``"surrogate_retry"``: returns a Retry whose message holds a lone surrogate;
    - ``"huge_retry"``: returns a Retry whose message is 5 MB;
    - ``"raise"``: raises every time;
    - ``"sleep_on_timeout"``: sleeps ``assigns["sleep"]`` seconds when answering a timeout, then OK;
    - anything else: OK.

    Each call is recorded (``Answer``) with its response in a form every database stores.
    """

    name = "poison"

    def service_responded(self, message: Message) -> Any:
        response = message.response
        assert response is not None
        stored = response.to_json()
        Answer.objects.create(
            message_id=message.id,
            status=response.status,
            value=stored["value"],
            error=stored["error"],
            assigns={"poison": message.assigns.get("poison", "")},
            decision=message.assigns.get("poison", "ok"),
        )
        poison = message.assigns.get("poison")
        if poison == "surrogate_retry":
            return Retry(100, message.assign("note", "\ud800"))
        if poison == "huge_retry":
            return Retry(100, message.assign("blob", "x" * 5_000_000))
        if poison == "raise":
            raise RuntimeError("service_responded is broken")
        if poison == "sleep_on_timeout" and response.status == "timeout":
            import time

            time.sleep(float(message.assigns["sleep"]))
        return OK

    def dispatch_timeout(self, message: Message) -> int:
        return int(message.assigns.get("timeout_ms", 5_000))
