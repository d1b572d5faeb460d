"""The wire format shared by beat and workers: a delivery's task id and its signed header.

Beat publishes each attempt as a Celery task whose keyword arguments are the message's ``raw_request``
and whose ``celery_scheduller`` header names the attempt (``AttemptRef``) and carries the rest of the
Message (ids, assigns), signed with the project's ``SECRET_KEY``. Workers trust nothing else: a task
without a valid header is not an alarm delivery, whatever its task id says.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from .message import Message, compact_json, from_json_value, to_json_value

#: The task header carrying the attempt and the Message without its raw_request (one JSON string).
HEADER = "celery_scheduller"
#: assigns keys an alarm may carry to be published to another Celery queue, or with a priority (0-9)
QUEUE_KEY = "celery_scheduller.queue"
PRIORITY_KEY = "celery_scheduller.priority"


@dataclasses.dataclass(frozen=True, slots=True)
class AttemptRef:
    """Names one published attempt of one alarm: the WHERE of every response write."""

    pk: int
    message_id: str
    scheduller: str
    attempt: int
    deadline: dt.datetime
    published_at: dt.datetime | None = None
    #: ``service_responded`` failures in a row before this attempt
    callback_failures: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON-native form, carried in the task's headers."""
        return {
            "pk": self.pk,
            "message_id": self.message_id,
            "scheduller": self.scheduller,
            "attempt": self.attempt,
            "deadline": self.deadline.isoformat(),
            "published_at": None if self.published_at is None else self.published_at.isoformat(),
            "callback_failures": self.callback_failures,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AttemptRef:
        """Inverse of ``to_json``."""
        published_at = data.get("published_at")
        return cls(
            pk=int(data["pk"]),
            message_id=str(data["message_id"]),
            scheduller=str(data["scheduller"]),
            attempt=int(data["attempt"]),
            deadline=dt.datetime.fromisoformat(data["deadline"]),
            published_at=None if published_at is None else dt.datetime.fromisoformat(published_at),
            callback_failures=int(data.get("callback_failures", 0)),
        )

    @classmethod
    def of_row(cls, row: Mapping[str, Any]) -> AttemptRef:
        """The published attempt a row fetched with ``store.ROW_FIELDS`` is at."""
        return cls(
            row["pk"],
            row["message_id"],
            row["scheduller"],
            row["attempt"],
            row["deadline"],
            row["published_at"],
            row["callback_failures"],
        )


def task_id_of(message_id: str, attempt: int, pk: int) -> str:
    """The Celery task id of one attempt: the same on every redelivery, and never the id of another attempt,
    nor of an attempt of a later alarm with the same message id (the row's ``pk``): a revoke names only it."""
    return f"{message_id}#{attempt}.{pk}"


def header_of(ref: AttemptRef, message: Message) -> dict[str, str]:
    """The headers that mark a task as the delivery of ``ref``; the task's kwargs carry raw_request."""
    body = compact_json(
        {
            "ref": ref.to_json(),
            "task": message.service_name,
            "id": message.id,
            "correlation_id": message.correlation_id,
            "causation_id": message.causation_id,
            "assigns": to_json_value(message.assigns, "assigns"),
        }
    )
    return {HEADER: f"{_sign(body)}.{body}"}


class BadHeader(ValueError):
    """A ``celery_scheduller`` header that this project did not sign, or cannot read."""


def read_header(
    headers: Mapping[str, Any] | None, kwargs: Mapping[str, Any] | None
) -> tuple[AttemptRef, Message] | None:
    """The attempt and Message a task delivers, from its headers and keyword arguments; None for a task
    that is no alarm delivery; ``BadHeader`` for a header this project's ``SECRET_KEY`` did not sign."""
    raw = (headers or {}).get(HEADER)
    if not raw:
        return None
    if not isinstance(raw, str) or "." not in raw:
        raise BadHeader("not a signed celery_scheduller header")
    signature, _dot, body = raw.partition(".")
    if not any(hmac.compare_digest(signature, _sign(body, key)) for key in _keys()):
        raise BadHeader("the header's signature does not match this project's SECRET_KEY")
    data = json.loads(body)
    message = Message(
        service_name=data["task"],
        raw_request=dict(kwargs or {}),
        id=data["id"],
        correlation_id=data["correlation_id"],
        causation_id=data["causation_id"],
        assigns=from_json_value(data["assigns"]),
    )
    return AttemptRef.from_json(data["ref"]), message


def _sign(body: str, key: bytes | None = None) -> str:
    return hmac.new(key or _keys()[0], body.encode(), hashlib.sha256).hexdigest()[:32]


@functools.cache
def _keys() -> tuple[bytes, ...]:
    """Keys derived from ``SECRET_KEY`` (signing) and ``SECRET_KEY_FALLBACKS`` (also accepted)."""
    from django.conf import settings

    secrets = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
    return tuple(hashlib.sha256(b"celery_scheduller.header:" + str(secret).encode()).digest() for secret in secrets)


#: What the broker's own headers (task name, ids, origin, kwargsrepr…) may take beside ours in one frame.
FRAME_SPARE = 8_192


def header_limit(connection: Any) -> int | None:
    """The most bytes our header may have on this broker connection, or None where headers are not limited:
    AMQP (RabbitMQ) sends a message's headers in one frame of at most the negotiated ``frame_max``."""
    transport = getattr(getattr(connection, "transport", None), "driver_type", "")
    if transport != "amqp":
        return None
    try:
        frame_max = int(connection.connection.frame_max)  # py-amqp's negotiated value; connects if needed
    except Exception:
        return None
    return max(0, frame_max - FRAME_SPARE)


#: RabbitMQ's and py-amqp's default frame_max
AMQP_FRAME_MAX = 131_072
#: What our header holds beside the message's assigns and ids: the attempt reference, keys, signature
HEADER_OVERHEAD = 512


def configured_header_limit(conf: Any) -> int | None:
    """``header_limit`` as the Celery configuration ``conf`` promises it, without connecting: for an AMQP
    broker URL, the frame_max of its transport options (default 131,072) less ``FRAME_SPARE``."""
    url = str(getattr(conf, "broker_write_url", None) or getattr(conf, "broker_url", None) or "")
    if url.split("://")[0].split("+")[0] not in ("amqp", "pyamqp", "amqps"):
        return None
    options = getattr(conf, "broker_transport_options", None) or {}
    return max(0, int(options.get("frame_max", AMQP_FRAME_MAX)) - FRAME_SPARE)


def header_size(message: Message, assigns_json: str) -> int:
    """About how many bytes ``header_of`` makes for ``message`` whose assigns encode to ``assigns_json``."""
    ids = message.service_name, message.id, message.correlation_id, message.causation_id
    return len(assigns_json) + sum(len(part) for part in ids) + HEADER_OVERHEAD
