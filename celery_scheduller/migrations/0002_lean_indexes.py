"""One index per searched column: the unique and db_index fields also had LIKE-pattern indexes on
PostgreSQL that every insert paid for and no query used. The new constraint and indexes are built before
the old ones go, so message ids stay unique throughout (MariaDB runs DDL outside transactions)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("celery_scheduller", "0001_initial"),
    ]

    operations = [
        migrations.AddConstraint(
            model_name="alarm",
            constraint=models.UniqueConstraint(fields=("message_id",), name="csched_message_id"),
        ),
        migrations.AddIndex(
            model_name="alarm",
            index=models.Index(fields=["aggregate_id"], name="csched_aggregate"),
        ),
        migrations.AddIndex(
            model_name="alarm",
            index=models.Index(fields=["correlation_id"], name="csched_correlation"),
        ),
        migrations.AlterField(
            model_name="alarm",
            name="message_id",
            field=models.CharField(max_length=255),
        ),
        migrations.AlterField(
            model_name="alarm",
            name="aggregate_id",
            field=models.CharField(max_length=255),
        ),
        migrations.AlterField(
            model_name="alarm",
            name="correlation_id",
            field=models.CharField(blank=True, default="", max_length=255),
        ),
    ]
