import os

INSTALLED_APPS += ["celery_scheduller", "reminders"]  # noqa: F821 - appended to the generated settings.py

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("DATABASE_NAME", "proj"),
        "USER": os.environ.get("DATABASE_USER", "postgres"),
        "HOST": os.environ.get("DATABASE_HOST", "127.0.0.1"),
    }
}
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_SCHEDULLER_CLASSES = ["reminders.alarms.ReminderAlarms"]
CELERY_SCHEDULLER_KEEP_FINISHED = 7 * 24 * 3600  # keep a week of history for the admin (seconds)
