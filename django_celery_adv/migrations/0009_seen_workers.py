"""SeenWorker, the last reading of each worker every process sees (issues 10 and 14),
and AppReading, each app's latest reading and its reader claim."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("django_celery_adv", "0008_task_records"),
    ]

    operations = [
        migrations.CreateModel(
            name="AppReading",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True,
                                           serialize=False, verbose_name="ID")),
                ("app_alias", models.CharField(max_length=100, unique=True, verbose_name="app")),
                ("read_at", models.DateTimeField(blank=True, null=True)),
                ("duration", models.FloatField(default=0.0)),
                ("reachable", models.BooleanField(default=True)),
                ("error", models.TextField(blank=True, default="")),
                ("commands", models.CharField(blank=True, default="", max_length=200)),
                ("unread", models.PositiveIntegerField(default=0)),
                ("missing", models.PositiveIntegerField(default=0)),
                ("unread_by", models.JSONField(blank=True, default=dict)),
                ("reader", models.CharField(blank=True, default="", max_length=64)),
                ("reader_until", models.DateTimeField(blank=True, null=True)),
            ],
            options={"verbose_name": "app reading"},
        ),
        migrations.CreateModel(
            name="SeenWorker",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True,
                                           serialize=False, verbose_name="ID")),
                ("app_alias", models.CharField(max_length=100, verbose_name="app")),
                ("hostname", models.CharField(max_length=255)),
                ("last_seen", models.DateTimeField()),
                ("values_at", models.DateTimeField(blank=True, null=True)),
                ("values", models.JSONField(blank=True, default=dict)),
            ],
            options={
                "verbose_name": "seen worker",
                "indexes": [models.Index(fields=["app_alias", "last_seen"],
                                         name="dca_seenworker_seen")],
                "constraints": [models.UniqueConstraint(fields=("app_alias", "hostname"),
                                                        name="dca_seenworker_unique")],
            },
        ),
    ]
