"""Headless Chromium for the browser test and the README's screenshots (scripts/screenshots.sh).

Debian's ``chromium`` + ``chromium-driver`` driven by selenium through
``/usr/bin/chromedriver``; Selenium Manager is kept offline, so nothing is
downloaded. JavaScript is off: the pages must work without it (plain links,
forms, meta refresh). The pages are served by pytest-django's ``live_server``
with the admin's static files (the test settings have no staticfiles app).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import django.contrib.admin
from django.test import override_settings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ADMIN_STATIC = Path(django.contrib.admin.__file__).parent / "static"
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--hide-scrollbars"]


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 900) -> Iterator:
    """A selenium ``webdriver.Chrome`` on Debian's chromium, quit on exit."""
    for path in (CHROMIUM, CHROMEDRIVER):
        assert os.path.exists(path), (
            f"{path} missing: apt-get install -y chromium chromium-driver (nothing is skipped)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*BROWSER_FLAGS, f"--window-size={width},{height}"]:
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def serving_admin_static() -> override_settings:
    """Settings under which ``live_server`` serves the admin's CSS (no staticfiles app)."""
    return override_settings(STATIC_ROOT=str(ADMIN_STATIC))


def navigate(browser, element, title: str) -> None:
    """Click and wait for the next page: a click does not wait for the navigation."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    element.click()
    WebDriverWait(browser, 30).until(expected_conditions.staleness_of(element))
    WebDriverWait(browser, 30).until(expected_conditions.title_contains(title))


def log_in(browser, base_url: str, username: str, password: str) -> None:
    """Through the admin's login form; ends on the admin index."""
    from selenium.webdriver.common.by import By

    browser.get(f"{base_url}/admin/login/?next=/admin/")
    browser.find_element(By.NAME, "username").send_keys(username)
    browser.find_element(By.NAME, "password").send_keys(password)
    navigate(browser, browser.find_element(By.CSS_SELECTOR, "input[type=submit]"),
             "Site administration")


def page_png(browser, path: Path, *, max_height: int = 1000) -> Path:
    """The whole page (up to ``max_height`` CSS px) as a PNG at the window's width.

    Through the DevTools protocol, so it needs no JavaScript on the page and
    leaves the window's size as it was.
    """
    metrics = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    width = int((metrics.get("cssLayoutViewport") or metrics["layoutViewport"])["clientWidth"])
    height = min(int(size["height"]), max_height)
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "clip": {"x": 0, "y": 0, "width": width, "height": height,
                                      "scale": 1}})
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
