"""The shop's Celery app: ``celery -A shop worker`` and ``celery -A shop beat -S celery_scheduller``."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")

app = Celery("shop")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
