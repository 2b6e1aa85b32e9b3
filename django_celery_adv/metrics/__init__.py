"""Prometheus metrics of every configured app: the collector and the ``/metrics`` view.

* :mod:`.collector`: :class:`~.collector.CeleryAdvCollector` and :func:`~.collector.render`
  (one scrape, in a registry of its own; no inspect broadcast);
* :mod:`.views`: the view, guarded by a permission or a bearer token; include
  ``django_celery_adv.urls`` to serve it.
"""

from .collector import METRICS, CeleryAdvCollector, metric_names, render

__all__ = ["METRICS", "CeleryAdvCollector", "metric_names", "render"]
