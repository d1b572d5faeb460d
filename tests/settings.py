"""Django settings of the test suite.

``CSCHED_DB`` picks the database: postgres (default), sqlite or mariadb; ``CSCHED_BROKER`` the broker URL
(Redis by default, ``amqp://guest:guest@127.0.0.1:5672//`` for RabbitMQ).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

BASE = Path(__file__).resolve().parent
DB = os.environ.get("CSCHED_DB", "postgres")

SECRET_KEY = "tests-only"
USE_TZ = True
TIME_ZONE = "UTC"
DEBUG = False
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "celery_scheduller",
    "django_celery_beat",  # AlarmDatabaseScheduler's tests
    "tests.testapp",
]
try:  # Django 6: django.tasks; Django 5.2: the django-tasks backport, an app of its own
    import django.tasks  # noqa: F401
except ImportError:
    INSTALLED_APPS.append("django_tasks")

TASKS = {
    "default": {
        "BACKEND": "celery_scheduller.task_backend.AlarmTaskBackend",
        "QUEUES": ["default", "other"],
        "OPTIONS": {"RESULT_TTL": 3600},
    },
    "retrying": {
        "BACKEND": "celery_scheduller.task_backend.AlarmTaskBackend",
        "OPTIONS": {"RETRY": {"ATTEMPTS": 3, "BACKOFF_MS": 200}},
    },
    # a project's own subclass, under a name of its own
    "subclassed": {"BACKEND": "tests.testapp.backends.ProjectTaskBackend"},
}
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
ROOT_URLCONF = "tests.urls"
STATIC_URL = "static/"
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if DB == "sqlite":
    _file = os.environ.get("CSCHED_SQLITE_FILE", str(BASE.parent / ".test-db.sqlite3"))
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": _file,
            # Beat, the worker and the tests write concurrently: take the write lock at BEGIN, wait for it.
            "OPTIONS": {"timeout": 30, "transaction_mode": "IMMEDIATE"},
            "TEST": {"NAME": _file},
        }
    }
elif DB == "postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("CSCHED_DB_NAME", "csched"),
            "USER": os.environ.get("PGUSER", "postgres"),
            "HOST": os.environ.get("PGHOST", "127.0.0.1"),
            "PORT": os.environ.get("PGPORT", "5432"),
            "TEST": {"NAME": os.environ.get("CSCHED_DB_NAME", "test_csched")},
        }
    }
elif DB == "mariadb":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.mysql",
            "NAME": os.environ.get("CSCHED_DB_NAME", "csched"),
            "USER": os.environ.get("MYSQL_USER", "root"),
            "HOST": os.environ.get("MYSQL_HOST", "127.0.0.1"),
            "PORT": os.environ.get("MYSQL_PORT", "3306"),
            "OPTIONS": {"charset": "utf8mb4"},
            "TEST": {"NAME": os.environ.get("CSCHED_DB_NAME", "test_csched"), "CHARSET": "utf8mb4"},
        }
    }
else:
    raise RuntimeError(f"CSCHED_DB must be postgres, sqlite or mariadb, not {DB!r}")

# A second database of the same kind, for the tests of CELERY_SCHEDULLER_DATABASE (created only when a test
# asks for it); CSCHED_ALARM_DATABASE names it in a worker started for those tests.
_alarms: dict[str, Any] = {**DATABASES["default"], "TEST": dict(DATABASES["default"]["TEST"])}  # type: ignore[arg-type]
_alarms["NAME"] = f"{_alarms['NAME']}_alarms"
_alarms["TEST"]["NAME"] = f"{_alarms['TEST']['NAME']}_alarms"
DATABASES["alarms"] = _alarms
CELERY_SCHEDULLER_DATABASE = os.environ.get("CSCHED_ALARM_DATABASE") or None

CELERY_BROKER_URL = os.environ.get("CSCHED_BROKER", "redis://127.0.0.1:6379/14")
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# Queue names of this run (``CSCHED_QUEUE``, set per run by .ci/run): runs that share a broker, or a
# RabbitMQ vhost, do not consume each other's tasks.
CSCHED_TEST_QUEUE = os.environ.get("CSCHED_QUEUE", "celery")
CSCHED_STALE_QUEUE = f"{CSCHED_TEST_QUEUE}.stale"
CELERY_TASK_DEFAULT_QUEUE = CSCHED_TEST_QUEUE
# tasks the default worker does not consume, for the stale-attempt test
CELERY_TASK_ROUTES = {"testapp.stale": {"queue": CSCHED_STALE_QUEUE}}

CELERY_SCHEDULLER_CLASSES = [
    "tests.testapp.alarms.TestAlarms",
    "tests.testapp.alarms.BrokenAlarms",
    "tests.testapp.alarms.FaultAlarms",
    "tests.testapp.alarms.PoisonAlarms",
]
CELERY_SCHEDULLER_POLL_INTERVAL = 200
CELERY_SCHEDULLER_ERROR_BACKOFF = 500
CELERY_SCHEDULLER_CALLBACK_MAX_FAILURES = 4
CELERY_SCHEDULLER_PUBLISH_AHEAD = int(os.environ.get("CSCHED_PUBLISH_AHEAD", "0"))  # the fault suite's "-ahead"
# the fault suite's "-no-ack-emulation": kombu's Redis transport keeps no copy of delivered messages
if os.environ.get("CSCHED_ACK_EMULATION") == "off":
    CELERY_BROKER_TRANSPORT_OPTIONS = {"ack_emulation": False}
# Ended alarms are kept as history (the admin and status tests read it); "0" runs the seed's default.
CELERY_SCHEDULLER_KEEP_FINISHED = int(os.environ.get("CSCHED_KEEP_FINISHED", "3600")) or None

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"celery_scheduller": {"handlers": ["console"], "level": os.environ.get("CSCHED_LOG", "WARNING")}},
}
# the start-up tests: a configuration error given to a beat or worker subprocess
if os.environ.get("CSCHED_BATCH_SIZE"):
    CELERY_SCHEDULLER_BATCH_SIZE = int(os.environ["CSCHED_BATCH_SIZE"])
# the Django Tasks runner under a hard time limit, as a project may set one (a test task sleeps past it)
CELERY_TASK_ANNOTATIONS = {"celery_scheduller.run_django_task": {"time_limit": 12}}
# the operations tests: metrics ports of a beat or worker subprocess, and how often they write their activity
for _name in ("METRICS_PORT", "WORKER_METRICS_PORT", "ACTIVITY_INTERVAL"):
    if os.environ.get(f"CSCHED_{_name}"):
        globals()[f"CELERY_SCHEDULLER_{_name}"] = int(os.environ[f"CSCHED_{_name}"])
