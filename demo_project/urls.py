from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("celery-adv/", include("django_celery_adv.urls")),  # /celery-adv/metrics
    path("", RedirectView.as_view(url="/admin/")),
]
