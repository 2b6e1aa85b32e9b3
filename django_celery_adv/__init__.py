"""Several Celery apps from Django settings, task locks, logging and monitoring."""

__version__ = "0.1.0"
