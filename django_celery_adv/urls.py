"""URLs of django-celery-adv outside the admin: the Prometheus ``metrics/`` view.

Include them under any prefix in the project's URLconf::

    path("celery-adv/", include("django_celery_adv.urls")),

which serves ``/celery-adv/metrics`` (URL name ``django_celery_adv:metrics``).
"""

from django.urls import path

from .metrics.views import metrics

app_name = "django_celery_adv"

urlpatterns = [path("metrics", metrics, name="metrics")]
