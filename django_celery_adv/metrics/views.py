"""The ``/metrics`` view: one scrape per request, for Prometheus or a signed-in operator.

Who gets in:

* a request with ``Authorization: Bearer <token>`` whose token equals
  ``CELERY_ADV["METRICS"]["TOKEN"]`` (compared in constant time). A request
  that sends an ``Authorization`` header with any other value, or any value
  while no token is set, gets 401 and is never let in by its session instead:
  a scraper with a wrong token should fail loudly, not half-work;
* otherwise a signed-in user with ``django_celery_adv.view_monitoring``, the
  permission of the monitoring pages (the metrics show the same facts, so one
  permission grants both, and no migration is needed); signed in without it:
  403; not signed in: a redirect to the admin login page (302).

The response is never cached (``never_cache``). A scrape never raises for a
dead broker or lock server (see :mod:`.collector`).
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.urls import NoReverseMatch, reverse
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from .. import conf
from ..admin.monitoring import VIEW_PERMISSION
from .collector import render


def bearer_token_valid(header: str) -> bool:
    """Whether an ``Authorization`` header carries the configured token."""
    token = conf.metrics("TOKEN")
    scheme, _, credential = header.strip().partition(" ")
    if not isinstance(token, str) or not token or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credential.strip().encode(), token.encode())


def _login_url() -> str:
    try:
        return reverse("admin:login")
    except NoReverseMatch:  # a project without the admin: its own login page
        return settings.LOGIN_URL


@never_cache
@require_safe
def metrics(request: HttpRequest) -> HttpResponse:
    header = request.META.get("HTTP_AUTHORIZATION")
    if header is not None:
        if not bearer_token_valid(header):
            response = HttpResponse(_("Invalid or missing bearer token for the metrics."),
                                    status=401, content_type="text/plain; charset=utf-8")
            response["WWW-Authenticate"] = 'Bearer realm="celery-adv metrics"'
            return response
    elif not request.user.is_authenticated:
        return redirect_to_login(request.get_full_path(), _login_url())
    elif not request.user.has_perm(VIEW_PERMISSION):
        raise PermissionDenied(_("You may not view the Celery metrics."))
    body, content_type = render()
    return HttpResponse(body, content_type=content_type)
