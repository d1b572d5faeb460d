"""A small shop: unpaid orders expire, customers get a (flaky, retried) payment reminder."""

from .celery import app as celery_app

__all__ = ["celery_app"]
