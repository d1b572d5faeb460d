"""Callbacks run on one instance per class, with the state the class was given (no services)."""

from __future__ import annotations

import threading

import pytest

from celery_scheduller import registry
from celery_scheduller.exceptions import ConfigurationError
from tests.testapp.alarms import TestAlarms


@pytest.fixture(autouse=True)
def fresh_state():
    TestAlarms.use_state(None)
    yield
    TestAlarms.use_state(None)


def test_later_constructions_do_not_change_what_callbacks_run_on():
    TestAlarms(state={"interval_ms": 1000})
    served = registry.get("tests")
    assert served.state == {"interval_ms": 1000}
    TestAlarms()  # a view building one to dispatch
    TestAlarms(state={"interval_ms": 1000})  # the same state again: allowed
    assert registry.get("tests") is served
    assert served.in_memory_interval() == 1000


def test_a_second_different_state_is_refused_where_it_is_given():
    TestAlarms(state={"interval_ms": 1000})
    with pytest.raises(ConfigurationError, match=r"TestAlarms already serves this process with another state"):
        TestAlarms(state={"interval_ms": 2000})
    assert registry.get("tests").state == {"interval_ms": 1000}


def test_use_state_replaces_it_on_purpose():
    TestAlarms(state={"interval_ms": 1000})
    before = registry.get("tests")
    TestAlarms.use_state({"interval_ms": 3000})
    after = registry.get("tests")
    assert after is not before and after.state == {"interval_ms": 3000}
    assert before.state == {"interval_ms": 1000}  # a callback running on the old instance keeps its state


def test_threads_constructing_instances_never_swap_the_served_one():
    TestAlarms(state={"interval_ms": 1000})
    served = registry.get("tests")
    seen: list[object] = []

    def views() -> None:
        for _ in range(200):
            TestAlarms()
            seen.append(registry.get("tests"))

    threads = [threading.Thread(target=views) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 800 and all(instance is served for instance in seen)
