"""Headless Chromium for the page tests: Debian's `chromium`, driven by Playwright.

No browser is downloaded: Playwright launches the system binary. Tests that need it skip,
naming the reason, where it is absent (CI installs it with apt-get).
"""
from __future__ import annotations

import contextlib
import os
import shutil

import pytest

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium_path() -> str:
    path = os.environ.get("DISTILLSR_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    return path


@contextlib.contextmanager
def browser_page(viewport=(1280, 900)):
    """Yield (page, console_errors): a fresh page, and a list collecting console errors and page errors."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the [test] extra")
    exe = chromium_path()
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page, errors
        finally:
            browser.close()


def artefact_dir() -> str:
    """Where screenshots are kept as test artefacts (DISTILLSR_ARTEFACTS, default ./test-artefacts)."""
    path = os.environ.get("DISTILLSR_ARTEFACTS", os.path.join(os.getcwd(), "test-artefacts"))
    os.makedirs(path, exist_ok=True)
    return path
