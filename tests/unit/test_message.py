"""Message, Response, Retry and the due-time rules: pure logic, no services."""

from __future__ import annotations

import datetime as dt
import json
from collections import OrderedDict, UserDict
from enum import IntEnum

import pytest

from celery_scheduller import OK, InvalidAlarm, InvalidResponse, Message, Response, Retry
from celery_scheduller.message import compact_json, refuse_nul_in_json, to_json_value
from celery_scheduller.scheduller import due_time, validate_decision

NOW = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
NAIVE = dt.datetime(2030, 1, 1)  # noqa: DTZ001 - the bad input under test


def test_new_generates_an_id_and_defaults_correlation_ids_to_it():
    message = Message.new("shop.tasks.expire_order", raw_request={"order_id": 7})
    assert len(message.id) == 32
    assert message.correlation_id == message.causation_id == message.id
    named = Message.new("t", id="x", correlation_id="c")
    assert (named.id, named.correlation_id, named.causation_id) == ("x", "c", "x")


def test_assign_returns_a_new_message_and_leaves_the_original_alone():
    message = Message.new("t", id="x")
    changed = message.assign("tries", 1)
    assert message.assigns == {} and changed.assigns == {"tries": 1}
    assert changed.id == message.id
    with pytest.raises(AttributeError):
        message.id = "y"  # type: ignore[misc]


def test_json_round_trip_keeps_aware_datetimes_and_the_response():
    when = dt.datetime(2030, 1, 1, 12, 0, 0, 5, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    message = (
        Message.new("t", {"a": [1, 2.5, None, True]}, id="x")
        .assign("dispatch_at", when)
        .assign("nested", {"list": [when]})
        .with_response(Response("error", error="RuntimeError: boom"))
    )
    again = Message.loads(message.dumps())
    assert again == message
    assert again.dispatch_at == when and again.dispatch_at.tzinfo is not None
    assert again.response is not None and not again.response.ok


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({1: "x"}, "key 1 is not a string"),
        ({"x": float("nan")}, "not valid JSON"),
        ({"x": b"bytes"}, "bytes"),
        ({"$datetime": "2030"}, "reserved"),
    ],
)
def test_values_json_cannot_carry_are_refused(value, error):
    with pytest.raises(InvalidAlarm, match=error):
        Message.new("t", value).to_json()


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({"a": {"b": [1, {2: "x"}]}}, r"raw_request\['a'\]\['b'\]\[1\]: key 2 is not a string"),
        ({"a": [0, float("inf")]}, r"raw_request\['a'\]\[1\]: inf is not valid JSON"),
        ({"a": {"b": NAIVE}}, r"raw_request\['a'\]\['b'\]: naive datetime"),
        ({"a": [{"$datetime": "x"}]}, r"raw_request\['a'\]\[0\]: the key '\$datetime' is reserved"),
        ({"a": {1, 2}}, r"raw_request\['a'\]: set"),
    ],
)
def test_a_refused_value_is_named_by_its_path(value, error):
    with pytest.raises(InvalidAlarm, match=error):
        to_json_value(value, "raw_request")


class _Tag(str):
    pass


def test_subclasses_of_json_types_encode_like_their_base_types():
    when = dt.datetime(2030, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    value = OrderedDict(a=(1, _Tag("x")), b=[when], c=UserDict({"d": True}), e=IntEnum("E", "ONE").ONE)
    encoded = to_json_value(value)
    assert encoded == {"a": [1, "x"], "b": [{"$datetime": "2029-12-31T22:00:00+00:00"}], "c": {"d": True}, "e": 1}
    assert type(encoded) is dict and type(encoded["a"]) is list


def test_response_ok_is_status_ok():
    assert Response("ok", value=3).ok
    assert not Response("timeout").ok
    assert Response.from_json(Response("ok", value={"x": 1}).to_json()) == Response("ok", value={"x": 1})
    with pytest.raises(ValueError, match="unknown response status"):
        Response.from_json({"status": "maybe"})


def test_due_time_takes_exactly_one_of_at_and_in_ms():
    assert due_time(None, 1500, NOW) == NOW + dt.timedelta(milliseconds=1500)
    other_zone = NOW.astimezone(dt.timezone(dt.timedelta(hours=3)))
    assert due_time(other_zone, None, NOW) == NOW
    assert due_time(other_zone, None, NOW).tzinfo == dt.UTC
    for at, in_ms, error in [
        (None, None, "exactly one"),
        (NOW, 1, "exactly one"),
        (NOW.replace(tzinfo=None), None, "naive"),
        (None, -1, "negative"),
        (None, True, "integer"),
    ]:
        with pytest.raises(InvalidAlarm, match=error):
            due_time(at, in_ms, NOW)


def test_retry_checks_its_arguments():
    assert Retry(0).message is None
    with pytest.raises(InvalidAlarm, match="non-negative"):
        Retry(-5)
    with pytest.raises(InvalidAlarm, match="must be a Message"):
        Retry(10, {"id": "x"})  # type: ignore[arg-type]


def test_validate_decision_accepts_ok_and_retry_of_the_same_message_only():
    message = Message.new("t", id="x")
    assert validate_decision(OK, message) is OK
    assert validate_decision(Retry(5, message.assign("n", 1)), message).in_ms == 5
    with pytest.raises(InvalidResponse, match=r"expected OK, Retry\(in_ms, message\) or Fail"):
        validate_decision("ok", message)
    with pytest.raises(InvalidResponse, match="message id 'y'"):
        validate_decision(Retry(5, Message.new("t", id="y")), message)
    with pytest.raises(InvalidResponse, match=r"Retry's message 'x': assigns\['bad'\]: object"):
        validate_decision(Retry(5, message.assign("bad", object())), message)
    with pytest.raises(InvalidResponse, match="Retry's message 'x': assigns contains a NUL character"):
        validate_decision(Retry(5, message.assign("bad", "\x00")), message)


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        ("\x00", True),
        ({"k\x00": 1}, True),
        ({"k": ["a", "b\x00c"]}, True),
        ("\\\x00", True),  # a backslash, then the character
        ("\\u0000", False),  # the six characters \u0000
        ("\\\\u0000", False),
        ({"u0000": "\\"}, False),
    ],
)
def test_refuse_nul_in_json_finds_the_character_not_its_spelling(value, refused):
    encoded = compact_json(value)
    if refused:
        with pytest.raises(InvalidAlarm, match="NUL"):
            refuse_nul_in_json(encoded, "value")
    else:
        refuse_nul_in_json(encoded, "value")
        assert json.loads(encoded) == value
