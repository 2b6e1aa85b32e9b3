"""TaskRecord (the task history kept from events, issue 10) and the recorder's
counters per app (TaskRecorderStats)."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("django_celery_adv", "0007_lockdefinition_beat_on_busy"),
    ]

    operations = [
        migrations.CreateModel(
            name='TaskRecorderStats',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('app_alias', models.CharField(max_length=100, unique=True, verbose_name='app')),
                ('events_seen', models.PositiveBigIntegerField(default=0)),
                ('events_written', models.PositiveBigIntegerField(default=0)),
                ('events_dropped', models.PositiveBigIntegerField(default=0)),
                ('last_event_at', models.DateTimeField(blank=True, null=True)),
                ('last_write_at', models.DateTimeField(blank=True, null=True)),
                ('workers', models.JSONField(blank=True, default=dict)),
                ('task_counts', models.JSONField(blank=True, default=dict)),
                ('recorder', models.CharField(blank=True, help_text='hostname and pid of the recorder that wrote last', max_length=255)),
            ],
            options={
                'verbose_name': 'task recorder counters',
                'verbose_name_plural': 'task recorder counters',
            },
        ),
        migrations.CreateModel(
            name='TaskRecord',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('app_alias', models.CharField(max_length=100, verbose_name='app')),
                ('task_id', models.CharField(max_length=255, verbose_name='task id')),
                ('name', models.CharField(blank=True, db_index=True, max_length=255)),
                ('state', models.CharField(choices=[('PENDING', 'pending'), ('RECEIVED', 'received'), ('STARTED', 'started'), ('SUCCESS', 'succeeded'), ('FAILURE', 'failed'), ('RETRY', 'retried'), ('REVOKED', 'revoked'), ('REJECTED', 'rejected')], max_length=20)),
                ('worker', models.CharField(blank=True, db_index=True, max_length=255)),
                ('args', models.TextField(blank=True)),
                ('kwargs', models.TextField(blank=True)),
                ('retryable', models.BooleanField(default=False)),
                ('result', models.TextField(blank=True)),
                ('exception', models.TextField(blank=True)),
                ('traceback', models.TextField(blank=True)),
                ('received_at', models.DateTimeField(blank=True, db_index=True, null=True, verbose_name='received')),
                ('started_at', models.DateTimeField(blank=True, null=True, verbose_name='started')),
                ('succeeded_at', models.DateTimeField(blank=True, null=True, verbose_name='succeeded')),
                ('failed_at', models.DateTimeField(blank=True, null=True, verbose_name='failed')),
                ('runtime', models.FloatField(blank=True, db_index=True, null=True, verbose_name='runtime (s)')),
                ('queue_wait', models.FloatField(blank=True, null=True, verbose_name='queue wait (s)')),
                ('retries', models.PositiveIntegerField(default=0)),
                ('parent_id', models.CharField(blank=True, db_index=True, max_length=255, verbose_name='parent id')),
                ('root_id', models.CharField(blank=True, db_index=True, max_length=255, verbose_name='root id')),
                ('state_timestamp', models.FloatField(default=0)),
                ('updated_at', models.DateTimeField(db_index=True, verbose_name='updated')),
            ],
            options={
                'verbose_name': 'task',
                'ordering': ['-id'],
                'permissions': [('retry_taskrecord', 'Can retry a task with the same arguments'), ('revoke_taskrecord', 'Can revoke a task'), ('terminate_taskrecord', 'Can terminate a running task')],
                'default_permissions': ('view', 'delete'),
                'indexes': [models.Index(fields=['app_alias', 'id'], name='dca_task_app_id'), models.Index(fields=['app_alias', 'updated_at'], name='dca_task_app_updated'), models.Index(fields=['state', 'id'], name='dca_task_state_id')],
                'constraints': [models.UniqueConstraint(fields=('task_id', 'app_alias'), name='dca_task_unique')],
            },
        ),
    ]
