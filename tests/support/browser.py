"""Headless Debian Chromium under Playwright, launched the one way every browser test needs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.processes import REQUIRE_ALL, require_binary

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the `test` extra installs it
    sync_playwright = None

# Without the background-networking flags Chromium keeps dialling out, and this machine's
# closed network refuses it many times a start.
HEADLESS_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def launched_chromium(*extra_args: str) -> Iterator:
    """For a module-scoped fixture: ``yield from launched_chromium(...)``."""
    if sync_playwright is None:
        message = "playwright is not installed (pip install '.[test]')"
        pytest.fail(message) if REQUIRE_ALL else pytest.skip(message)
    executable = require_binary("chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable,
                                              args=[*HEADLESS_ARGS, *extra_args])
        yield chromium
        chromium.close()
