"""Django settings of the comparison benchmark (``python bench/compare.py``).

One PostgreSQL database (``csched_bench_run``), Redis db 12 as the broker and db 13 for the record of
task starts. Both beat schedulers (ours and django-celery-beat's) read this database.
"""

from __future__ import annotations

import os

SECRET_KEY = "bench-only"
USE_TZ = True
TIME_ZONE = "UTC"
DEBUG = False
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "celery_scheduller", "django_celery_beat"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        # BENCH_DB_NAME: a database of its own for a benchmark that runs beside another (soak.py, scale.py)
        "NAME": os.environ.get("BENCH_DB_NAME", "csched_bench_run"),
        "USER": os.environ.get("PGUSER", "postgres"),
        "HOST": os.environ.get("PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("PGPORT", "5432"),
        # Celery's Django fixup closes the task's database connections before and after every task:
        # without a pool the result hook opens a new connection per task (20 % of worker time).
        "OPTIONS": {"pool": {"min_size": 2, "max_size": 16}},
    }
}

REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379")
# compare.py --broker: another broker (e.g. RabbitMQ) for the tasks; the hits stay in Redis
# BENCH_REDIS_DBS="broker,hits": other Redis database numbers for a benchmark that runs beside another
_BROKER_DB, _HITS_DB = os.environ.get("BENCH_REDIS_DBS", "12,13").split(",")
CELERY_BROKER_URL = os.environ.get("BENCH_BROKER") or f"{REDIS}/{_BROKER_DB}"
HITS_URL = f"{REDIS}/{_HITS_DB}"
CELERY_TIMEZONE = "UTC"
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = True

CELERY_SCHEDULLER_CLASSES = ["bench.alarms.BenchAlarms", "bench.alarms.SoakAlarms"]
# the seed's default: a finished alarm leaves the table; BENCH_KEEP_FINISHED (seconds) keeps history (soak.py)
CELERY_SCHEDULLER_KEEP_FINISHED = int(os.environ.get("BENCH_KEEP_FINISHED", "0")) or None
if os.environ.get("BENCH_PRUNE_INTERVAL"):  # soak.py --pruning off: the first pass at start, none after it
    CELERY_SCHEDULLER_PRUNE_INTERVAL = int(os.environ["BENCH_PRUNE_INTERVAL"])
# BENCH_DB_CONNECTIONS (bench/worker_cost.py --connections): "pool" (above), or "persistent" /
# "persistent-reuse" (CONN_MAX_AGE = None, without / with Celery's CELERY_DB_REUSE_MAX; see celery_app.py)
if os.environ.get("BENCH_DB_CONNECTIONS", "pool") != "pool":
    DATABASES["default"]["OPTIONS"] = {}
    DATABASES["default"]["CONN_MAX_AGE"] = None
# BENCH_MAX_IN_FLIGHT=none: beat publishes as fast as it can, for the rows that measure beat alone
CELERY_SCHEDULLER_MAX_IN_FLIGHT = (
    None if os.environ.get("BENCH_MAX_IN_FLIGHT") == "none" else int(os.environ.get("BENCH_MAX_IN_FLIGHT", "1000"))
)
# BENCH_PUBLISH_AHEAD (bench/compare.py --publish-ahead): alarms go out that many ms before they are due
# (unset: the package's default)
if os.environ.get("BENCH_PUBLISH_AHEAD"):
    CELERY_SCHEDULLER_PUBLISH_AHEAD = int(os.environ["BENCH_PUBLISH_AHEAD"])
# compare.py --workloads metrics: beat and worker with the metrics and the dashboard's activity counts off, then on
if os.environ.get("BENCH_METRICS") == "off":
    CELERY_SCHEDULLER_METRICS = False
    CELERY_SCHEDULLER_ACTIVITY_INTERVAL = None
# BENCH_PRECISE_WAKE=off: the worker's loop wakes on the poller's own millisecond (WORKER_PRECISE_WAKE = False)
if os.environ.get("BENCH_PRECISE_WAKE") == "off":
    CELERY_SCHEDULLER_WORKER_PRECISE_WAKE = False
CELERY_SCHEDULLER_POLL_INTERVAL = int(os.environ.get("BENCH_POLL_INTERVAL", "500"))
# BENCH_ACK_EMULATION=off (bench/compare.py --no-ack-emulation, celery_scheduller's workers only): kombu's
# Redis transport keeps no copy of the messages a worker took in (README: "Redis workers that serve only
# alarms")
if os.environ.get("BENCH_ACK_EMULATION") == "off":
    CELERY_BROKER_TRANSPORT_OPTIONS = {"ack_emulation": False}
