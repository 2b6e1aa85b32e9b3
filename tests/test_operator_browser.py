"""End to end in headless Chromium (JavaScript off): the Queues page, a purge, worker control.

Screenshots of every page go under the build directory (``screenshots/operator-*.png``).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.urls import reverse

from django_celery_adv.monitoring import forget_workers
from tests.browser import chromium, log_in, navigate, page_png
from tests.test_monitoring_admin import make_user
from tests.test_queues import drop, fill, with_apps

SCREENSHOTS = Path(settings.BUILD_DIR) / "screenshots"

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.workers]



def test_operator_purges_a_queue_and_resizes_a_pool(styled_live_server, default_worker):
    from selenium.webdriver.common.by import By

    forget_workers()
    user = make_user("operator", "view_monitoring", "purge_queue", "resize_worker_pool",
                     "shutdown_worker")  # password "pw"
    name = f"hops-browser-{uuid.uuid4().hex[:8]}"
    base = styled_live_server.url
    with with_apps(browserq={"broker_url": settings.REDIS_URL, "task_default_queue": name}), \
            chromium() as browser:
        queue = fill("browserq", name, 5, priorities=1)
        try:
            log_in(browser, base, "operator", "pw")
            navigate(browser, browser.find_element(By.LINK_TEXT, "Celery monitoring"),
                     "Celery workers")
            link = browser.find_element(By.CSS_SELECTOR, ".object-tools a[href$='/queues/']")
            navigate(browser, link, "Celery queues")
            row = browser.find_element(By.CSS_SELECTOR, "#queues-browserq tbody tr")
            cells = [cell.text for cell in row.find_elements(By.CSS_SELECTOR, "th, td")]
            assert cells[:2] == [name, "5"]
            page_png(browser, SCREENSHOTS / "operator-queues.png")

            navigate(browser, row.find_element(By.CSS_SELECTOR, "a[href*='/queues/purge/']"),
                     "Purge queue")
            assert browser.find_element(By.CSS_SELECTOR, ".dca-count").text == "5"
            page_png(browser, SCREENSHOTS / "operator-purge-confirm.png")
            navigate(browser, browser.find_element(By.CSS_SELECTOR, "input[type=submit]"),
                     "Celery queues")
            assert "5 messages deleted" in browser.find_element(By.CSS_SELECTOR,
                                                                ".messagelist").text
            assert redis.Redis.from_url(settings.REDIS_URL).llen(name) == 0
        finally:
            drop("browserq", queue)

        worker_url = reverse("admin:django_celery_adv_monitoring_worker",
                             args=["default", default_worker.name])
        browser.get(f"{base}{worker_url}")
        navigate(browser, browser.find_element(By.ID, "worker-control-link"),
                 "Control worker")
        page_png(browser, SCREENSHOTS / "operator-worker-control.png")
        for action, answer in (("pool_grow", "pool will grow"),
                               ("pool_shrink", "pool will shrink")):
            button = browser.find_element(By.CSS_SELECTOR,
                                          f"#action-{action} input[type=submit]")
            navigate(browser, button, "Control worker")
            assert answer in browser.find_element(By.CSS_SELECTOR, ".messagelist").text

        navigate(browser, browser.find_element(By.CSS_SELECTOR, "#action-shutdown a"),
                 "Shut down worker")
        page_png(browser, SCREENSHOTS / "operator-shutdown-confirm.png")
        navigate(browser, browser.find_element(By.CSS_SELECTOR, "#shutdown-confirm a.cancel-link"),
                 "Control worker")
    assert default_worker.process.poll() is None  # only confirmed shutdowns are sent
    assert LogEntry.objects.filter(user=user).count() == 3  # purge, grow, shrink
