"""Debian's chromium, driven by Playwright, for the tests that look at a page (Locust's web UI, the
job page, Prometheus's): Playwright's own browser download is not used. .ci/run installs it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
# headless in a container, as root: no sandbox, no GPU, nothing fetched from the network
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def require() -> None:
    """Skip the test where Debian's chromium is missing (before it starts anything else)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does it as root)")


@contextmanager
def chromium() -> Iterator:
    """A headless chromium (Playwright's Browser), closed afterwards."""
    require()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()
