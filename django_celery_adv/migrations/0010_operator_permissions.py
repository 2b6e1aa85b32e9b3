"""operator permissions for queues and worker remote control (issue 10)."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("django_celery_adv", "0009_seen_workers"),
    ]

    operations = []
