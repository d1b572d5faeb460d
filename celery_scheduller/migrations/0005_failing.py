"""Whether the alarm's latest answer was an error, a timeout or a failed ``service_responded`` (the admin's
"failing" view), with an index that finds the few failing alarms among a million. The column has a database
default, so rows inserted by an earlier version during a rolling deploy get False."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("celery_scheduller", "0004_callback_failures"),
    ]

    operations = [
        migrations.AddField(
            model_name="alarm",
            name="failing",
            field=models.BooleanField(default=False, db_default=False),
        ),
        migrations.AddIndex(
            model_name="alarm",
            index=models.Index(fields=["failing", "state", "dispatch_at"], name="csched_failing"),
        ),
    ]
