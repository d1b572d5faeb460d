"""The timeout and pruning indexes by time first: (deadline, state) and (finished_at, state).

Led by ``state``, either served PostgreSQL as an index of pending rows whenever the table's statistics knew
of none (a table emptied or filled since it was analysed): beat's claim then read and sorted every due row
instead of walking the (scheduller, state, dispatch_at) index. Only published rows have a deadline and only
ended rows a ``finished_at``, so the time-first order serves the same queries. The new indexes are built
before the old ones go."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("celery_scheduller", "0002_lean_indexes"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="alarm",
            index=models.Index(fields=["deadline", "state"], name="csched_deadline_state"),
        ),
        migrations.AddIndex(
            model_name="alarm",
            index=models.Index(fields=["finished_at", "state"], name="csched_finished_state"),
        ),
        migrations.RemoveIndex(
            model_name="alarm",
            name="csched_state_deadline",
        ),
        migrations.RemoveIndex(
            model_name="alarm",
            name="csched_state_finished",
        ),
    ]
