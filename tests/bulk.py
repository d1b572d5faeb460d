"""Fill the alarm table with many rows in one statement, for scale tests and the admin benchmark."""

from __future__ import annotations

from django.db import connection

from celery_scheduller.models import Alarm

_COLUMNS = (
    "message_id, scheduller, task_name, raw_request, assigns, correlation_id, causation_id, aggregate_id, "
    "dispatch_at, state, attempt, timeout_ms, created_at, updated_at"
)


def fill(count: int, scheduller: str = "tests") -> None:
    """Insert ``count`` alarms spread over the next 30 days; every 10th one finished, every 50th failed."""
    table = Alarm._meta.db_table
    if connection.vendor == "postgresql":
        sql = f"""
            INSERT INTO {table} ({_COLUMNS})
            SELECT 'bulk-' || n, %s, 'testapp.record', '{{}}'::jsonb, '{{}}'::jsonb, 'corr-' || n, 'bulk-' || n,
                   'order-' || (n %% 50000), now() + (n * interval '2.6 seconds'),
                   CASE WHEN n %% 50 = 0 THEN 'failed' WHEN n %% 10 = 0 THEN 'finished' ELSE 'pending' END,
                   0, 5000, now(), now()
            FROM generate_series(1, %s) AS n
        """
    elif connection.vendor == "sqlite":
        sql = f"""
            WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < %s)
            INSERT INTO {table} ({_COLUMNS})
            SELECT 'bulk-' || n, %s, 'testapp.record', '{{}}', '{{}}', 'corr-' || n, 'bulk-' || n,
                   'order-' || (n %% 50000), strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '+' || (n * 2.6) || ' seconds'),
                   CASE WHEN n %% 50 = 0 THEN 'failed' WHEN n %% 10 = 0 THEN 'finished' ELSE 'pending' END,
                   0, 5000, datetime('now'), datetime('now')
            FROM seq
        """
    elif connection.vendor == "mysql":
        sql = f"""
            INSERT INTO {table} ({_COLUMNS})
            SELECT CONCAT('bulk-', seq), %s, 'testapp.record', '{{}}', '{{}}', CONCAT('corr-', seq),
                   CONCAT('bulk-', seq),
                   CONCAT('order-', seq %% 50000), UTC_TIMESTAMP(6) + INTERVAL (seq * 2600000) MICROSECOND,
                   CASE WHEN seq %% 50 = 0 THEN 'failed' WHEN seq %% 10 = 0 THEN 'finished' ELSE 'pending' END,
                   0, 5000, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6)
            FROM seq_1_to_{int(count)}
        """
    else:
        raise NotImplementedError(connection.vendor)
    params = {"postgresql": [scheduller, count], "sqlite": [count, scheduller], "mysql": [scheduller]}[
        connection.vendor
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        if connection.vendor == "postgresql":
            cursor.execute(f"ANALYZE {table}")
