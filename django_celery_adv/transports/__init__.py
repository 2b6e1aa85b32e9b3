"""kombu transports shipped with django-celery-adv (see each module for what it guarantees)."""
