"""Open WebUI's own web UI in headless Chromium, in front of a real gateway on loopback.

Open WebUI (from .ci/openwebui.txt, in its own venv) is set up as an operator would: an
OpenAI connection whose URL ends in ``/v1/`` and whose headers name the session, title,
tag and follow-up generation off. The test picks a model in the page, sends two messages
and reads the answers; the gateway has two sessions on two fake bridges, so the words on
the page tell which session served them. One server start for the module: it takes tens
of seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from support.browser import HEADLESS_ARGS, sync_playwright
from support.client import record_requests, sessions_on_two_bridges
from support.openwebui import OpenWebUI, open_webui_binary
from support.processes import REQUIRE_ALL, require_binary

pytestmark = pytest.mark.process

WEBUI_TEXT = "The webui session's bridge wrote this, and Open WebUI showed it."
MODEL = "webui-model"  # an alias the session registers, so it is in /v1/models
TIMEOUT_MS = 90_000


def chat_in_the_page(chromium: str, url: str, prompts: list[str], screenshot: Path) -> list[str]:
    """Open Open WebUI, pick MODEL, send each prompt in one chat; the answers' texts.

    Runs in a thread: Playwright's sync API must not block the reactor serving the gateway.
    """
    from playwright.sync_api import expect

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=HEADLESS_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url + "/")
            page.wait_for_selector("#chat-input")
            page.click("#model-selector-model-button")
            page.get_by_placeholder("Search a model").fill(MODEL)
            page.click(f'button[aria-label="Select {MODEL} model"]')
            expect(page.locator("#model-selector-model-button")).to_contain_text(MODEL)
            answers = page.locator("#response-content-container")
            for number, prompt in enumerate(prompts):
                page.click("#chat-input")
                page.keyboard.type(prompt)
                page.keyboard.press("Enter")
                expect(answers).to_have_count(number + 1)
                expect(answers.nth(number)).to_contain_text(WEBUI_TEXT)
            page.screenshot(path=str(screenshot))
            return [answers.nth(i).inner_text().strip() for i in range(len(prompts))]
        finally:
            browser.close()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    where = Path(os.environ.get("LMGW_ARTIFACTS") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


@pytest_twisted.ensureDeferred
async def test_open_webui_chats_through_the_gateway(gateway_factory, listen, reactor, tmp_path,
                                                    artifacts):
    open_webui_binary()
    if sync_playwright is None:
        message = "playwright is not installed (pip install '.[test]')"
        pytest.fail(message) if REQUIRE_ALL else pytest.skip(message)
    chromium = require_binary("chromium")
    gw, bridge = await sessions_on_two_bridges(gateway_factory, listen, reactor, "webui",
                                               WEBUI_TEXT, {MODEL: "fake-model"})
    seen = record_requests(gw)
    server = OpenWebUI(tmp_path, gw.url + "/v1/", {"X-Session-Name": "webui"})
    try:
        await deferToThread(server.wait_ready)
        # An admin's first visit opens the release notes over the page.
        await deferToThread(server.sign_in, {"showChangelog": False})
        prompts = ["Hello from Open WebUI", "And a second question"]
        answers = await deferToThread(chat_in_the_page, chromium, server.url, prompts,
                                      artifacts / "open-webui-chat.png")
    finally:
        server.stop()
    assert answers == [WEBUI_TEXT, WEBUI_TEXT]
    # It asked with the doubled slash of a URL that ends in /, and was served, not redirected.
    chats = [r for r in seen if r["uri"].endswith("/chat/completions")]
    assert [(r["method"], r["uri"], r["status"], r["session"]) for r in chats] == [
        ("POST", "/v1//chat/completions", 200, "webui")] * 2
    assert any(r["uri"] == "/v1//models" and r["status"] == 200 for r in seen), seen
    # One bridge turn per message (title, tags and follow-ups off), streamed, on the
    # webui session's bridge with the alias resolved; the default session saw nothing.
    turns = [s for s in bridge.seen if s["path"] == "/v1/chat/completions"]
    assert [(t["body"]["model"], t["body"].get("stream")) for t in turns] == [
        ("fake-model", True)] * 2
    assert [(m["role"], m["content"]) for m in turns[1]["body"]["messages"]
            if m["role"] != "system"] == [("user", prompts[0]), ("assistant", WEBUI_TEXT),
                                          ("user", prompts[1])]
    assert gw.bridge.seen == []
