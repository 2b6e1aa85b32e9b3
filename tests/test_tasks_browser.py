"""End to end in headless Chromium (JavaScript off): the Tasks pages of the task history.

An operator filters the history to the failed tasks, opens one, follows the link
to its parent, and revokes a task from its page (a real revoke on the app's Redis
broker). Screenshots go under the build directory (``screenshots/tasks-*.png``).
The recorder that fills the table from real events is tested in test_events.py;
here the rows are written directly so that the pages are what is tested.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.utils import timezone

from django_celery_adv.models import TaskRecord
from tests.browser import chromium, log_in, navigate, page_png
from tests.test_monitoring_admin import make_user

SCREENSHOTS = Path(settings.BUILD_DIR) / "screenshots"

pytestmark = pytest.mark.django_db(transaction=True)



def record(task_id: str, name: str, state: str, **fields) -> TaskRecord:
    now = timezone.now()
    return TaskRecord.objects.create(
        app_alias="default", task_id=task_id, name=name, state=state, worker="w1@host",
        received_at=now - timedelta(seconds=5), started_at=now - timedelta(seconds=4),
        updated_at=now, state_timestamp=now.timestamp(), **fields)


def test_operator_finds_a_failed_task_its_parent_and_revokes_one(styled_live_server):
    from selenium.webdriver.common.by import By

    parent_id, child_id = (f"{kind}-{uuid.uuid4().hex[:8]}" for kind in ("parent", "child"))
    record(parent_id, "reports.build", "SUCCESS", result="'done'", runtime=1.5,
           succeeded_at=timezone.now())
    record(child_id, "reports.send", "FAILURE", args="(42,)", parent_id=parent_id,
           root_id=parent_id, exception="ValueError('no recipient')",
           traceback="Traceback (most recent call last):\nValueError: no recipient",
           failed_at=timezone.now(), runtime=0.2)
    make_user("historian", "view_taskrecord", "revoke_taskrecord")  # password "pw"
    base = styled_live_server.url
    with chromium() as browser:
        log_in(browser, base, "historian", "pw")
        navigate(browser, browser.find_element(By.CSS_SELECTOR, "a[href$='/taskrecord/']"),
                 "task")
        listed = {row.find_element(By.CSS_SELECTOR, "th").text
                  for row in browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")}
        assert {parent_id, child_id} <= listed
        page_png(browser, SCREENSHOTS / "tasks-list.png")

        # The state filter of the sidebar, a plain link (no JavaScript).
        failure = browser.find_element(By.CSS_SELECTOR, "#changelist-filter a[href*='FAILURE']")
        navigate(browser, failure, "task")
        rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
        assert [row.find_element(By.CSS_SELECTOR, "th").text for row in rows] == [child_id]

        navigate(browser, rows[0].find_element(By.LINK_TEXT, child_id), child_id)
        page = browser.find_element(By.ID, "content").text
        assert "ValueError('no recipient')" in page and "(42,)" in page
        page_png(browser, SCREENSHOTS / "tasks-detail.png")

        navigate(browser, browser.find_element(By.PARTIAL_LINK_TEXT, parent_id), parent_id)
        assert child_id in browser.find_element(By.ID, "content").text  # listed as a child

        revoke = browser.find_element(By.XPATH, "//button[normalize-space()='Revoke']")
        navigate(browser, revoke, parent_id)
        assert f"Revoked task {parent_id}." in browser.find_element(
            By.CSS_SELECTOR, ".messagelist").text
        # Without terminate_taskrecord the page offers no Terminate button.
        assert not browser.find_elements(By.XPATH, "//button[normalize-space()='Terminate']")
    assert LogEntry.objects.filter(object_repr__contains=parent_id,
                                   change_message__contains="Revoked").count() == 1
