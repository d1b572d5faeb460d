"""Settings of the example shop.

Embedded default (the demo): SQLite and kombu's ``filesystem://`` transport under ``example_project/var``.
Production-like: ``SHOP_DB=postgres`` (``SHOP_DB_NAME``, ``PGHOST`` …) and
``SHOP_BROKER=redis://127.0.0.1:6379/0`` or ``amqp://guest:guest@127.0.0.1:5672//``.
"""

import os
from pathlib import Path

BASE = Path(__file__).resolve().parent.parent
VAR = Path(os.environ.get("SHOP_VAR", BASE / "var"))
VAR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = os.environ.get("SHOP_SECRET_KEY", "example-only-not-secret")
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "shop.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "celery_scheduller",
    "shop",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
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
STATIC_URL = "static/"

if os.environ.get("SHOP_DB", "sqlite") == "postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("SHOP_DB_NAME", "shop"),
            "USER": os.environ.get("PGUSER", "postgres"),
            "HOST": os.environ.get("PGHOST", "127.0.0.1"),
            "PORT": os.environ.get("PGPORT", "5432"),
            # Celery closes a task's connections after every task: a pool keeps the result hook from
            # opening a new one each time
            "OPTIONS": {"pool": {"min_size": 1, "max_size": 8}},
        }
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR / "shop.sqlite3",
            # web, beat and worker write to one file: take the write lock at BEGIN and wait for it
            "OPTIONS": {"timeout": 30, "transaction_mode": "IMMEDIATE"},
        }
    }

CELERY_BROKER_URL = os.environ.get("SHOP_BROKER", "filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    _queue = VAR / "broker"
    (_queue / "processed").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_queue),
        "data_folder_out": str(_queue),
        "processed_folder": str(_queue / "processed"),
        # kombu keeps exchange bindings here (default: ./control in the working directory)
        "control_folder": str(_queue / "control"),
        "store_processed": False,
        "polling_interval": 0.1,
    }
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    # an ordinary periodic task, run by the same beat that delivers the alarms
    "shop-stats": {"task": "shop.tasks.log_stats", "schedule": 10.0},
}

CELERY_SCHEDULLER_CLASSES = ["shop.alarms.OrderAlarms"]

# Django's Tasks framework on the same engine (Django 6's django.tasks; on Django 5.2 the django-tasks
# backport, `pip install "celery-scheduller[tasks]"`): shop.jobs is written against it.
try:
    import django.tasks  # noqa: F401

    TASKS_AVAILABLE = True
except ImportError:
    try:
        import django_tasks  # noqa: F401

        INSTALLED_APPS.append("django_tasks")
        TASKS_AVAILABLE = True
    except ImportError:
        TASKS_AVAILABLE = False
if TASKS_AVAILABLE:
    TASKS = {"default": {"BACKEND": "celery_scheduller.task_backend.AlarmTaskBackend"}}
CELERY_SCHEDULLER_POLL_INTERVAL = 250
# keep ended alarms a day, so the admin shows finished, failed and cancelled ones with their attempts
CELERY_SCHEDULLER_KEEP_FINISHED = int(os.environ.get("SHOP_KEEP_FINISHED", "86400")) or None

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"celery_scheduller": {"handlers": ["console"], "level": os.environ.get("SHOP_LOG", "WARNING")}},
}
