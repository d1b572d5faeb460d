"""One validation for everything an alarm stores, and the safe form of what comes back (no services)."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from django.test import override_settings

from celery_scheduller import InvalidAlarm, InvalidResponse, Message, Response, Retry
from celery_scheduller.message import MAX_DEPTH, MAX_STORED_ERROR, MAX_STORED_VALUE, storable_json
from celery_scheduller.scheduller import EARLIEST_DUE, LATEST_DUE, due_time, encode_for_storage, validate_decision

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        ({"k": "\ud800"}, r"raw_request contains a lone surrogate"),
        ({"\udc00": 1}, r"raw_request contains a lone surrogate"),
        ({"k": ["a\x00"]}, r"raw_request contains a NUL character"),
        ({"deep": nested(MAX_DEPTH)}, rf"raw_request\['deep'\]\[0\].*nested deeper than {MAX_DEPTH} levels"),
        ({"deep": nested(990)}, rf"nested deeper than {MAX_DEPTH} levels"),
        ({"when": dt.date(2030, 1, 1)}, r"raw_request\['when'\]: date"),
        ({"when": dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1)))}, "outside the years 1 to 9999"),
    ],
)
def test_what_no_database_stores_is_refused_naming_the_field(value: object, refused: str) -> None:
    with pytest.raises(InvalidAlarm, match=refused):
        storable_json(value, "raw_request")


def test_what_is_accepted_and_how_it_comes_back() -> None:
    when = dt.datetime(2030, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    encoded = storable_json({"t": (1, 2), "s": "\U0001f600 \\ud800", "when": when, "deep": nested(MAX_DEPTH - 1)}, "x")
    message = Message.loads(json.dumps({"service_name": "t", "raw_request": json.loads(encoded), "id": "m"}))
    assert message.raw_request["t"] == [1, 2]  # tuples come back as lists
    assert message.raw_request["s"] == "\U0001f600 \\ud800"  # a pair is text; an escaped backslash is not an escape
    assert message.raw_request["when"] == when and message.raw_request["when"].tzinfo == dt.UTC


def test_the_message_of_a_retry_is_checked_as_dispatch_checks_it() -> None:
    message = Message.new("t", id="x")
    with pytest.raises(InvalidResponse, match="lone surrogate"):
        validate_decision(Retry(5, message.assign("note", "\ud800")), message)
    with pytest.raises(InvalidResponse, match="nested deeper"):
        validate_decision(Retry(5, message.assign("deep", nested(100))), message)
    with override_settings(CELERY_SCHEDULLER_MAX_PAYLOAD=1_000), pytest.raises(InvalidResponse, match="MAX_PAYLOAD"):
        validate_decision(Retry(5, message.assign("big", "x" * 5_000)), message)
    with pytest.raises(InvalidResponse, match="task name"):
        validate_decision(Retry(5, Message("a\x00", {}, "x", "x", "x")), message)


def test_due_times_stay_within_what_the_databases_store() -> None:
    assert due_time(LATEST_DUE, None, NOW) == LATEST_DUE and due_time(EARLIEST_DUE, None, NOW) == EARLIEST_DUE
    with pytest.raises(InvalidAlarm, match="outside the times the database stores"):
        due_time(dt.datetime(999, 12, 31, tzinfo=dt.UTC), None, NOW)
    with pytest.raises(InvalidAlarm, match="outside the times the database stores"):
        due_time(dt.datetime(9999, 6, 1, tzinfo=dt.UTC), None, NOW)
    with pytest.raises(InvalidAlarm, match="outside the years 1 to 9999"):
        due_time(dt.datetime(9999, 12, 31, 23, tzinfo=dt.timezone(dt.timedelta(hours=-5))), None, NOW)
    with pytest.raises(InvalidAlarm, match="outside the times the database stores"):
        due_time(None, (LATEST_DUE - NOW).days * 86_400_000 + 86_400_000, NOW)


def test_size_counts_every_stored_field() -> None:
    message = Message.new("t", {"a": "x" * 400}, id="m")
    raw, assigns = encode_for_storage(message, 1_000)
    assert json.loads(raw) == {"a": "x" * 400} and json.loads(assigns) == {}
    with pytest.raises(InvalidAlarm, match=r"message 'm' is \d+ bytes as JSON, more than .*MAX_PAYLOAD \(300\)"):
        encode_for_storage(message, 300)


def test_a_response_that_cannot_be_stored_is_stored_in_a_safe_form_with_a_note() -> None:
    stored = Response("error", value="ok\x00", error="Boom: \x00 and \ud800 " + "e" * 20_000).to_json()
    text = json.dumps(stored)
    assert "\\u0000" not in text and "\\ud800" not in text
    assert len(stored["error"]) == MAX_STORED_ERROR and stored["error"].startswith("Boom: \ufffd and \ufffd")
    assert stored["value"] == repr("ok\x00").replace("\x00", "\ufffd")
    assert "NUL characters replaced" in stored["note"] and "cut from" in stored["note"]
    assert "lone surrogates replaced" in stored["note"] and "value stored as its repr" in stored["note"]
    big = Response("ok", value={"k": "v" * (MAX_STORED_VALUE + 10)}).to_json()
    assert len(big["value"]) == MAX_STORED_VALUE and "value stored as its repr" in big["note"]
    assert Response("ok", value={"k": [1, 2]}).to_json() == {"status": "ok", "value": {"k": [1, 2]}, "error": None}
    assert Response.from_json(stored).note == stored["note"]


def test_an_object_whose_repr_raises_is_still_stored() -> None:
    class Weird:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    stored = Response("ok", value=Weird()).to_json()
    assert "repr failed: RuntimeError" in stored["value"]
