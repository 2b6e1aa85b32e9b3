"""End to end: an operator logs in with headless Chromium (JavaScript off) and uses the pages.

The browser and the live server with the admin's static files come from
:mod:`tests.browser` (shared with scripts/screenshots.sh); a screenshot is saved
under the build directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User

from django_celery_adv.locks.backends import lock_backends
from django_celery_adv.locks.backends.base import Holder
from django_celery_adv.models import LockDefinition
from django_celery_adv.monitoring import forget_workers
from tests.browser import chromium, log_in, navigate

SCREENSHOTS = Path(settings.BUILD_DIR) / "screenshots"

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.workers]



@pytest.fixture
def browser():
    with chromium() as driver:
        yield driver


def test_operator_reads_the_workers_page(browser, styled_live_server, default_worker,
                                         global_worker, twin_worker):
    from selenium.webdriver.common.by import By

    forget_workers()
    user = User.objects.create_user("operator", password="operator-pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(
        codename__in=["view_monitoring", "force_release_lock", "view_lockdefinition",
                      "change_lockdefinition"]))
    LockDefinition.objects.create(name="nightly-report", capacity=2)
    lease = lock_backends["default"].acquire("nightly-report", 2,
                                             Holder(task_id="task-in-browser"), 300)
    base = styled_live_server.url

    log_in(browser, base, "operator", "operator-pw")
    navigate(browser, browser.find_element(By.LINK_TEXT, "Celery monitoring"), "Celery workers")

    assert browser.find_element(By.TAG_NAME, "h1").text == "Celery workers"
    for alias, worker in (("default", default_worker), ("global", global_worker),
                          ("twin", twin_worker)):
        rows = browser.find_elements(By.CSS_SELECTOR,
                                     f'#workers-table tbody tr[data-app="{alias}"]')
        cells = [[cell.text for cell in row.find_elements(By.CSS_SELECTOR, "th, td")]
                 for row in rows]
        assert [row[0] for row in cells] == [worker.name]
        assert cells[0][2].startswith("online") and cells[0][3] == "2"
    # The admin's stylesheet was applied (the page is the admin's, not bare HTML).
    header = browser.find_element(By.ID, "header")
    assert header.value_of_css_property("background-color") not in ("rgba(0, 0, 0, 0)", "")

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / "monitoring-workers.png"
    assert browser.save_screenshot(str(path)) and path.stat().st_size > 10_000

    # The worker link leads to its detail page.
    navigate(browser, browser.find_element(By.LINK_TEXT, default_worker.name),
             f"Worker {default_worker.name}")
    assert browser.find_element(By.TAG_NAME, "h1").text == f"Worker {default_worker.name}"
    browser.save_screenshot(str(SCREENSHOTS / "monitoring-worker-detail.png"))

    # Lock holders, and a force release: a real POST with the CSRF token, no JS.
    navigate(browser, browser.find_element(By.CSS_SELECTOR, "ul.object-tools a[href$='/locks/']"),
             "Lock holders")
    row = browser.find_element(By.ID, "lock-holders").find_element(
        By.XPATH, ".//tr[td/code[text()='task-in-browser']]")
    assert str(lease.token) in row.text
    browser.save_screenshot(str(SCREENSHOTS / "monitoring-lock-holders.png"))
    navigate(browser, row.find_element(By.CSS_SELECTOR, "input[type=submit]"), "Lock holders")
    assert f"Released token {lease.token} of nightly-report." in browser.find_element(
        By.CSS_SELECTOR, "ul.messagelist").text
    assert lock_backends["default"].holders("nightly-report") == []
    assert "task-in-browser" not in browser.find_element(By.ID, "lock-holders").text

    # The lock's own admin: its state in words, its holders by host and pid to the
    # second, and a name that cannot be edited (code finds the row by it).
    again = lock_backends["default"].acquire("nightly-report", 2, Holder(task_id="task-again"),
                                              300)
    navigate(browser, browser.find_element(By.LINK_TEXT, "Lock definitions"), "lock definition")
    assert browser.find_element(By.CSS_SELECTOR, "#result_list td.field-state").text == "active"
    assert browser.find_element(By.CSS_SELECTOR, "#result_list td.field-holders_now").text \
        == "1 / 2"
    browser.save_screenshot(str(SCREENSHOTS / "lock-definitions.png"))
    navigate(browser, browser.find_element(By.LINK_TEXT, "nightly-report"), "nightly-report")
    [holder] = browser.find_elements(By.CSS_SELECTOR, "table.dca-holders tbody tr")
    cells = [cell.text for cell in holder.find_elements(By.TAG_NAME, "td")]
    assert cells[1] == "task-again" and cells[2] == f"{again.holder.hostname} (pid {os.getpid()})"
    assert cells[3] == again.acquired_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert cells[5] == str(again.token)
    assert browser.find_elements(By.NAME, "capacity") and not browser.find_elements(By.NAME,
                                                                                      "name")
    now_section = holder.find_element(By.XPATH, "./ancestor::fieldset")
    assert now_section.screenshot(str(SCREENSHOTS / "lock-definition-holders.png"))
    lock_backends["default"].release(again)
