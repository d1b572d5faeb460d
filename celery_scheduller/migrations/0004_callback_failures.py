"""How many times in a row ``service_responded`` failed for the alarm (a database default too, so that rows
inserted by statements of an earlier version, during a rolling deploy, get 0)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("celery_scheduller", "0003_index_order"),
    ]

    operations = [
        migrations.AddField(
            model_name="alarm",
            name="callback_failures",
            field=models.PositiveIntegerField(default=0, db_default=0),
        ),
    ]
