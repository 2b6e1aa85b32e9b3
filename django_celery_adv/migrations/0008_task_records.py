"""TaskRecord, the task history kept from events (issue 10)."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("django_celery_adv", "0007_lockdefinition_beat_on_busy"),
    ]

    operations = []
