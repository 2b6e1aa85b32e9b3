"""operator permissions for queues and worker remote control (issue 10)."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("django_celery_adv", "0009_seen_workers"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="monitoring",
            options={
                "default_permissions": (),
                "managed": False,
                "permissions": [
                    ("view_monitoring", "Can view the Celery monitoring pages"),
                    ("purge_queue", "Can purge a Celery queue"),
                    ("resize_worker_pool", "Can grow or shrink a worker's pool"),
                    ("autoscale_worker", "Can set a worker's autoscale bounds"),
                    ("manage_worker_consumers", "Can add or cancel a worker's queue consumers"),
                    ("set_task_rate_limit", "Can set a task's rate limit on a worker"),
                    ("set_task_time_limit", "Can set a task's time limits on a worker"),
                    ("shutdown_worker", "Can shut down a worker"),
                ],
                "verbose_name": "Celery monitoring",
                "verbose_name_plural": "Celery monitoring",
            },
        ),
    ]
