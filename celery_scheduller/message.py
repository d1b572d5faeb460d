"""Message and Response: what is scheduled and what came back, both plain JSON on the wire.

``Message`` is the seed's ``X3m.System.Message`` reduced to the fields a scheduled delivery needs.
Messages are immutable: ``assign`` returns a new one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from .exceptions import InvalidAlarm

#: The key that marks an encoded datetime inside stored or transported JSON.
DATETIME_TAG = "$datetime"

Status = Literal["ok", "error", "timeout"]
STATUSES: tuple[Status, ...] = ("ok", "error", "timeout")


_COMPACT = json.JSONEncoder(separators=(",", ":"))

#: ``\u0000`` in JSON text, not preceded by an escaped backslash (``\\u0000`` is the text "\u0000")
_NUL_IN_JSON = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

_NO_NUL = "PostgreSQL cannot store the NUL character (\\x00) in text or JSON"


def refuse_nul(text: str, where: str) -> None:
    """Raise ``InvalidAlarm`` if ``text`` holds a NUL character or a lone surrogate, on every database alike."""
    if "\x00" in text:
        raise InvalidAlarm(f"{where} contains a NUL character: {_NO_NUL}")
    found = None if text.isascii() else _SURROGATE.search(text)
    if found is not None:
        raise InvalidAlarm(f"{where} contains a lone surrogate ({found.group()!r}): {_NO_SURROGATE}")


def refuse_nul_in_json(encoded: str, where: str) -> None:
    """``refuse_nul`` for a value as ``compact_json`` encoded it (anywhere: a string or a key).

    ``compact_json`` escapes every non-ASCII character, so a character above U+FFFF arrives as a pair of
    surrogate escapes; a lone one (half a pair) is what no database stores as text.
    """
    if "\\u0000" in encoded and _NUL_IN_JSON.search(encoded):
        raise InvalidAlarm(f"{where} contains a NUL character: {_NO_NUL}")
    if ("\\ud" in encoded or "\\uD" in encoded) and _lone_surrogate_in_json(encoded):
        raise InvalidAlarm(f"{where} contains a lone surrogate: {_NO_SURROGATE}")


_NO_SURROGATE = "half of a UTF-16 pair is not text any database stores (UTF-8 has no encoding for it)"
_SURROGATE = re.compile("[\ud800-\udfff]")
#: a surrogate escape (not preceded by an escaped backslash), with the escape after it if there is one
_SURROGATE_ESCAPE = re.compile(
    r"(?<!\\)((?:\\\\)*)\\u(d[89ab][0-9a-f]{2}|d[c-f][0-9a-f]{2})(\\u[dD][c-fC-F][0-9a-fA-F]{2})?", re.I
)


def _lone_surrogate_in_json(encoded: str) -> bool:
    position = 0
    while True:
        found = _SURROGATE_ESCAPE.search(encoded, position)
        if found is None:
            return False
        high = found.group(2).lower()[1] in "89ab"
        if not high or found.group(3) is None:
            return True  # a low half alone, or a high half not followed by a low one
        position = found.end()


def compact_json(value: Any) -> str:
    """``value`` (JSON-native) as JSON without spaces; one shared encoder, not one per call."""
    return _COMPACT.encode(value)


#: How deeply raw_request, assigns and a Retry's message may nest (dicts and lists): far inside Python's
#: recursion limit (1,000) and PostgreSQL's, so no process meets a value it cannot decode.
MAX_DEPTH = 32


def to_json_value(value: Any, where: str = "value") -> Any:
    """Return ``value`` as JSON-native data, aware datetimes tagged so they come back as datetimes.

    Raises ``InvalidAlarm`` naming ``where`` for anything JSON cannot carry (sets, objects, naive
    datetimes, non-string keys, nesting deeper than ``MAX_DEPTH``), so bad input fails where it is
    given, never later in beat. Strings are checked apart (``refuse_nul_in_json`` on the encoded text).
    """
    try:
        return _plain_json_value(value, 0)
    except _NotPlain:
        return _json_value(value, where, 0)


class _NotPlain(Exception):
    """A value ``_plain_json_value`` leaves to ``_json_value``: a subclass, or one to refuse by name."""


_INFINITIES = (float("inf"), float("-inf"))


def _plain_json_value(value: Any, depth: int) -> Any:
    """``to_json_value`` for the built-in types only, naming no path: the hot path of ``dispatch_many``."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is dict:
        if depth >= MAX_DEPTH:
            raise _NotPlain
        out = {}
        for key, item in value.items():
            if type(key) is not str or key == DATETIME_TAG:
                raise _NotPlain
            out[key] = _plain_json_value(item, depth + 1)
        return out
    if kind is list or kind is tuple:
        if depth >= MAX_DEPTH:
            raise _NotPlain
        return [_plain_json_value(item, depth + 1) for item in value]
    if kind is float and value == value and value not in _INFINITIES:
        return value
    if kind is dt.datetime and value.utcoffset() is not None:
        try:
            return {DATETIME_TAG: value.astimezone(dt.UTC).isoformat()}
        except OverflowError:
            raise _NotPlain from None
    raise _NotPlain


def _json_value(value: Any, where: str, depth: int) -> Any:
    """``to_json_value`` for any value, naming ``where`` in the error it raises."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidAlarm(f"{where}: {value!r} is not valid JSON")
        return value
    if isinstance(value, dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidAlarm(f"{where}: naive datetime {value!r}; use a timezone-aware datetime")
        try:
            return {DATETIME_TAG: value.astimezone(dt.UTC).isoformat()}
        except OverflowError:
            raise InvalidAlarm(f"{where}: {value!r} is outside the years 1 to 9999 in UTC") from None
    if isinstance(value, (Mapping, list, tuple)) and depth >= MAX_DEPTH:
        raise InvalidAlarm(f"{where}: nested deeper than {MAX_DEPTH} levels (dicts and lists)")
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidAlarm(f"{where}: key {key!r} is not a string; JSON objects have string keys")
            if key == DATETIME_TAG:
                raise InvalidAlarm(f"{where}: the key {DATETIME_TAG!r} is reserved")
            out[key] = _json_value(item, f"{where}[{key!r}]", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_json_value(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise InvalidAlarm(f"{where}: {type(value).__name__} {_safe_repr(value)[:200]} is not JSON-serializable")


def storable_json(value: Any, where: str) -> str:
    """``value`` as the compact JSON text stored for it; ``InvalidAlarm`` naming ``where`` for anything the
    databases cannot keep (see ``to_json_value``, NUL characters and lone surrogates)."""
    encoded = compact_json(to_json_value(value, where))
    refuse_nul_in_json(encoded, where)
    return encoded


#: The longest error text, and response value as JSON, stored for one attempt; longer ones are cut.
MAX_STORED_ERROR = 8_192
MAX_STORED_VALUE = 65_536


def safe_text(text: str, limit: int = MAX_STORED_ERROR) -> tuple[str, str]:
    """``text`` in a form every database stores: NUL characters and lone surrogates replaced by U+FFFD,
    cut to ``limit`` characters. Returns the text and a note saying what was changed ("" when nothing)."""
    notes = []
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
        notes.append("NUL characters replaced")
    if not text.isascii() and _SURROGATE.search(text):
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        text = _SURROGATE.sub("\ufffd", text)
        notes.append("lone surrogates replaced")
    if len(text) > limit:
        notes.append(f"cut from {len(text)} to {limit} characters")
        text = text[:limit]
    return text, "; ".join(notes)


def from_json_value(value: Any) -> Any:
    """Inverse of ``to_json_value``: tagged datetimes become aware datetimes again."""
    if isinstance(value, dict):
        if len(value) == 1 and DATETIME_TAG in value:
            return dt.datetime.fromisoformat(value[DATETIME_TAG])
        return {key: from_json_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_json_value(item) for item in value]
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class Response:
    """What came back for one delivery attempt.

    ``status`` is ``"ok"`` (``value`` holds the task's return value), ``"error"`` (``error`` names the
    exception, also for time limits and lost workers) or ``"timeout"`` (nothing within
    ``dispatch_timeout``).
    """

    status: Status
    value: Any = None
    error: str | None = None
    #: Set on a stored response whose value or error had to be changed to be stored (what was changed).
    note: str | None = None

    @property
    def ok(self) -> bool:
        """True when the task ran and returned."""
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        """JSON-native form, as stored: always storable. A value JSON cannot carry is stored as its repr,
        error text and values too long or holding what no database stores are cut or mended, and ``note``
        says so; ``service_responded`` saw the response as it came."""
        notes = [self.note] if self.note else []
        try:
            value = to_json_value(self.value, "response value")
            encoded = compact_json(value)
            refuse_nul_in_json(encoded, "response value")
            if len(encoded) > MAX_STORED_VALUE:
                raise InvalidAlarm(f"response value is {len(encoded)} characters as JSON")
        except Exception as exc:  # whatever the value does, the attempt's answer is stored
            value, changed = safe_text(_safe_repr(self.value), MAX_STORED_VALUE)
            notes.append(f"value stored as its repr ({exc})" + (f"; {changed}" if changed else ""))
        error = self.error
        if error is not None:
            error, changed = safe_text(error)
            if changed:
                notes.append(f"error text: {changed}")
        data: dict[str, Any] = {"status": self.status, "value": value, "error": error}
        if notes:
            data["note"] = safe_text("; ".join(notes), 1_000)[0]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Response:
        """Build a Response from ``to_json`` output."""
        status = data["status"]
        if status not in STATUSES:
            raise ValueError(f"unknown response status {status!r}")
        return cls(
            status=status, value=from_json_value(data.get("value")), error=data.get("error"), note=data.get("note")
        )


def describe(error: object) -> str:
    """A one-line name of an exception: its type and message."""
    if isinstance(error, BaseException):
        try:
            text = str(error)
        except Exception:
            text = "(its message could not be read)"
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return _safe_repr(error)


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception as exc:  # a repr that raises (or recurses without end) still leaves a trace
        return f"<{type(value).__name__} whose repr failed: {type(exc).__name__}>"


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """A message to deliver: the Celery task ``service_name`` called with ``raw_request`` as kwargs.

    Build one with ``Message.new``. ``assigns`` carries user data across retries; the package sets
    ``assigns["dispatch_at"]`` (and ``assigns["late"]`` for an alarm published after its time).
    """

    service_name: str
    raw_request: dict[str, Any]
    id: str
    correlation_id: str
    causation_id: str
    assigns: dict[str, Any] = dataclasses.field(default_factory=dict)
    response: Response | None = None

    @classmethod
    def new(
        cls,
        service_name: str,
        raw_request: Mapping[str, Any] | None = None,
        *,
        id: str | None = None,  # noqa: A002 - the seed's field name
        correlation_id: str | None = None,
        causation_id: str | None = None,
        assigns: Mapping[str, Any] | None = None,
    ) -> Message:
        """Create a message; ``id`` is generated when omitted, the correlation ids default to it."""
        if not isinstance(service_name, str) or not service_name:
            raise InvalidAlarm(f"service_name must be a non-empty task name, got {service_name!r}")
        refuse_nul(service_name, "service_name")
        if raw_request is None:
            raw_request = {}
        if not isinstance(raw_request, Mapping):
            raise InvalidAlarm(
                f"raw_request must be a dict (it becomes the task's keyword arguments), "
                f"got {type(raw_request).__name__}"
            )
        message_id = uuid.uuid4().hex if id is None else id
        for name, value in (("id", message_id), ("correlation_id", correlation_id), ("causation_id", causation_id)):
            if value is None:
                continue
            if not isinstance(value, str) or not value or len(value) > 255:
                raise InvalidAlarm(f"{name} must be a non-empty string of at most 255 characters, got {value!r}")
            refuse_nul(value, name)
        return cls(
            service_name=service_name,
            raw_request=dict(raw_request),
            id=message_id,
            correlation_id=correlation_id or message_id,
            causation_id=causation_id or message_id,
            assigns=dict(assigns or {}),
        )

    def assign(self, key: str, value: Any) -> Message:
        """Return a copy with ``assigns[key] = value``."""
        return self._with_assigns({**self.assigns, key: value})

    def _with_assigns(self, assigns: dict[str, Any]) -> Message:
        # the constructor, not dataclasses.replace: dispatch_many assigns per alarm
        return Message(
            self.service_name, self.raw_request, self.id, self.correlation_id, self.causation_id, assigns, self.response
        )

    def with_response(self, response: Response | None) -> Message:
        """Return a copy carrying ``response``."""
        return dataclasses.replace(self, response=response)

    @property
    def dispatch_at(self) -> dt.datetime | None:
        """When the alarm is due (``assigns["dispatch_at"]``), or None before it was dispatched."""
        value = self.assigns.get("dispatch_at")
        return value if isinstance(value, dt.datetime) else None

    def to_json(self) -> dict[str, Any]:
        """JSON-native form; raises ``InvalidAlarm`` when a field cannot be carried as JSON."""
        return {
            "service_name": self.service_name,
            "raw_request": to_json_value(self.raw_request, "raw_request"),
            "id": self.id,
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "assigns": to_json_value(self.assigns, "assigns"),
            "response": None if self.response is None else self.response.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Message:
        """Build a Message from ``to_json`` output."""
        response = data.get("response")
        return cls(
            service_name=data["service_name"],
            raw_request=from_json_value(data["raw_request"]),
            id=data["id"],
            correlation_id=data.get("correlation_id") or data["id"],
            causation_id=data.get("causation_id") or data["id"],
            assigns=from_json_value(data.get("assigns") or {}),
            response=None if response is None else Response.from_json(response),
        )

    def dumps(self) -> str:
        """The message as one JSON string."""
        return compact_json(self.to_json())

    @classmethod
    def loads(cls, text: str) -> Message:
        """Inverse of ``dumps``."""
        return cls.from_json(json.loads(text))
