"""SeenWorker, the last reading of each worker every process sees (issues 10 and 14)."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("django_celery_adv", "0008_task_records"),
    ]

    operations = []
