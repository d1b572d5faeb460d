"""Save a screenshot of the alarm admin of a running demo (``manage.py demo``) to docs/admin.png.

    python docs/admin_screenshot.py [--url http://127.0.0.1:8000] [--query "?status=failing"]

Uses Debian's chromium (/usr/bin/chromium) through Playwright; logs in as the demo user.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--query", default="")
    parser.add_argument("--out", default=str(Path(__file__).with_name("admin.png")))
    args = parser.parse_args()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-background-networking"]
        )
        page = browser.new_page(viewport={"width": 1366, "height": 860})  # a laptop screen
        page.goto(f"{args.url}/admin/login/")
        page.evaluate("localStorage.setItem('django.admin.navSidebarIsOpen', 'false')")
        page.goto(f"{args.url}/admin/login/?next=/admin/celery_scheduller/alarm/{args.query}")
        page.fill("#id_username", "demo")
        page.fill("#id_password", "demo")
        page.click("input[type=submit]")
        page.wait_for_selector("#result_list")
        page.screenshot(path=args.out)
        browser.close()


if __name__ == "__main__":
    main()
