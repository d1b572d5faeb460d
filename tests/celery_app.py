"""The Celery app of the test suite (worker: ``celery -A tests.celery_app worker``)."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

app = Celery("tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()  # every installed app, as a project does

if os.environ.get("CSCHED_WORKER_TASKS"):  # the test worker: a task beat and the test process do not know
    app.conf.imports = ("tests.testapp.worker_tasks",)

if os.environ.get("CSCHED_STOCK_CONSUMER"):  # a worker whose consumer is Celery's own: none of the package's steps
    import django
    from celery import signals

    django.setup()  # the package's app connects its receivers in ready(): take this one out before worker_init
    signals.worker_init.disconnect(dispatch_uid="celery_scheduller.prompt_prefetch")

if os.environ.get("CSCHED_OTEL_FILE"):  # the trace tests: every span this process ends, as a JSON line in that file
    from tests.otel import export_to_file

    export_to_file(os.environ["CSCHED_OTEL_FILE"], celery=bool(os.environ.get("CSCHED_OTEL_CELERY")))
