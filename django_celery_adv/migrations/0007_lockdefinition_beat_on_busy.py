"""LockDefinition.beat_on_busy (issue 9)."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("django_celery_adv", "0006_periodic_task_app"),
    ]

    operations = [
        migrations.AddField(
            model_name="lockdefinition",
            name="beat_on_busy",
            field=models.CharField(blank=True, choices=[("", "as the app's beat setting (BEAT ON_BUSY)"), ("skip", "skip the run"), ("send", "send it anyway")], default="", help_text="A periodic task using this lock is due while the lock is full: skip that run (logged with the holders) or send it anyway (then on_busy decides in the worker). Empty: CELERY_ADV['BEAT']['ON_BUSY'] of the app, default skip.", max_length=10, verbose_name="at beat, when busy"),
        ),
    ]
