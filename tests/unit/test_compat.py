"""Every internal of Celery, kombu or Django the package relies on is where ``compat`` expects it, on the
versions installed here (each tox environment: Celery 5.5 and 5.7, Django 5.2 and 6). A release that moves
one fails this test; the package itself then logs once and runs without that optimisation."""

from __future__ import annotations

import logging

import pytest

from celery_scheduller import compat


def test_every_internal_relied_on_is_there():
    found = compat.check()
    assert found and all(found.values()), {name: there for name, there in found.items() if not there}


def test_a_moved_internal_falls_back_and_says_so_once(caplog: pytest.LogCaptureFixture):
    class Bare:
        pass

    compat._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="celery_scheduller"):
        with compat.library_errors(Bare()):
            pass
        with compat.library_errors(Bare()):
            pass
        assert compat.prepare_cursor(Bare(), "cursor") == "cursor"
        assert compat.eta_callbacks(Bare()) == []
        assert compat.prefetch_window(type("P", (), {"hub": Bare(), "qos": Bare()})()) is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len([w for w in warnings if "_reraise_as_library_errors" in w]) == 1
    assert any("_prepare_cursor" in w for w in warnings) and any("apply_eta_task" in w for w in warnings)
    assert any("QoS" in w for w in warnings)


def test_task_options_without_the_private_getter_come_from_the_task():
    class Task:
        queue = "alarms"
        priority = 3
        time_limit = None

    assert compat.task_exec_options(Task()) == {"queue": "alarms", "priority": 3}


def test_postgresql_without_psycopg_3_is_reported(monkeypatch: pytest.MonkeyPatch):
    import sys

    from django.db import connections

    from celery_scheduller import checks

    class Postgres:
        vendor = "postgresql"

    monkeypatch.setitem(sys.modules, "psycopg", None)  # import raises ImportError: psycopg2 alone
    monkeypatch.setattr(type(connections), "__iter__", lambda self: iter(["default"]))
    monkeypatch.setattr(type(connections), "__getitem__", lambda self, alias: Postgres())
    found = checks._check_driver()
    assert [m.id for m in found] == ["celery_scheduller.E006"] and "celery-scheduller[postgres]" in found[0].hint
