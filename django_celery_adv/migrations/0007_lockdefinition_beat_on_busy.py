"""LockDefinition.beat_on_busy (issue 9)."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("django_celery_adv", "0006_periodic_task_app"),
    ]

    operations = []
