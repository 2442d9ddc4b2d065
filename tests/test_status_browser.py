"""The status page in real headless Chromium, against a real gateway daemon.

The daemon has a session on the default bridge (a real ``lmgateway fake-bridge``) and one
on a bridge that is down. The test reads the page as an operator would, watches it refresh,
uses an action, and writes screenshots to $LMGW_ARTIFACTS (default: the test's tmp dir).

Regenerate the README's screenshot with:
    LMGW_ARTIFACTS=docs .venv/bin/pytest tests/test_status_browser.py -k screenshot
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import pytest

from support.browser import launched_chromium
from support.processes import free_port, http, wait_for

ADMIN = "status-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
SID = "12345678-1234-4234-8234-123456789abc"
MID = "87654321-4321-4321-8321-cba987654321"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def browser():
    yield from launched_chromium()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    where = Path(os.environ.get("LMGW_ARTIFACTS") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


def register(gateway, name: str, **fields) -> None:
    body = {"domain": "lmarena.ai", "session_name": name, "session_id": SID, "message_id": MID,
            **fields}
    status, _, answer = http("POST", gateway.url + "/session/register", body, AUTH)
    assert status == 200, answer


def chat(gateway, name: str) -> int:
    return http("POST", gateway.url + "/v1/chat/completions", CHAT,
                {**AUTH, "X-Session-Name": name, "X-Target-Domain": "lmarena.ai"})[0]


def report(gateway) -> dict:
    status, _, body = http("GET", gateway.url + "/status.json", headers=AUTH)
    assert status == 200, body
    return body


def session_in(body: dict, name: str) -> dict:
    return next(s for s in body["sessions"] if s["session_name"] == name)


@pytest.fixture
def gateway(daemon_factory, fake_bridge_process):
    gateway = daemon_factory("--bridge-url", fake_bridge_process, "--log-requests",
                             env={"GATEWAY_ADMIN_TOKEN": ADMIN})
    register(gateway, "team-bridge")
    register(gateway, "team-broken", bridge_base_url=f"http://127.0.0.1:{free_port()}")
    assert chat(gateway, "team-broken") == 502  # its last error
    # the probe ticks every few seconds: wait until both bridges have been asked
    wait_for(lambda: all(b["probe"] for b in report(gateway)["bridges"])
             and len(report(gateway)["bridges"]) == 2, 20, what="both bridges probed")
    return gateway


def open_page(browser, gateway, *, dark: bool = False, phone: bool = False):
    viewport = {"width": 390, "height": 844} if phone else {"width": 1280, "height": 900}
    context = browser.new_context(
        viewport=viewport, color_scheme="dark" if dark else "light",
        http_credentials={"username": "admin", "password": ADMIN})
    page = context.new_page()
    response = page.goto(gateway.url + "/status")
    assert response.status == 200
    return context, page


def row(page, name: str):
    return page.locator(f"tr[id='s-lmarena.ai-{name}']")


def test_the_page_renders_a_bridge_session_and_a_broken_bridge(browser, gateway, artifacts):
    context, page = open_page(browser, gateway)
    try:
        good, broken = row(page, "team-bridge"), row(page, "team-broken")
        assert good.locator("[data-f=connected]").inner_text() == "yes"
        assert good.locator("[data-f=served_by]").inner_text() == "bridge"
        assert good.locator("[data-f='last_error.code']").inner_text() == "none"
        assert broken.locator("[data-f=connected]").inner_text() == "no"
        assert broken.locator("[data-f=connected]").get_attribute("data-state") == "bad"
        assert broken.locator("[data-f='last_error.code']").inner_text() == "BRIDGE_ERROR"
        bridges = page.locator("tr[data-row^=bridges]")
        assert bridges.count() == 2
        assert bridges.nth(0).locator("[data-f=probe]").inner_text() == "yes"
        assert bridges.nth(1).locator("[data-f=probe]").inner_text() == "no: BRIDGE_ERROR (unreachable)"
        assert page.locator("[data-f='gateway.store.status']").inner_text() == "ok"
        assert int(page.locator("[data-f='gateway.last_5_minutes.errors']").inner_text()) >= 1
        text = page.content()
        assert ADMIN not in text and "lmrt1." not in text
    finally:
        context.close()


def test_screenshot(browser, gateway, artifacts):
    """Light, dark and phone; status.png is the one the README shows."""
    chat(gateway, "team-bridge")
    for name, options in (("status.png", {}), ("status-dark.png", {"dark": True}),
                          ("status-phone.png", {"phone": True})):
        context, page = open_page(browser, gateway, **options)
        try:
            page.screenshot(path=str(artifacts / name), full_page=True)
        finally:
            context.close()
        assert (artifacts / name).stat().st_size > 10_000
    dark_context, dark = open_page(browser, gateway, dark=True)
    try:  # dark mode really is dark: the page background is not white
        background = dark.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background != "rgb(255, 255, 255)" and background.startswith("rgb(15, 18, 22")
    finally:
        dark_context.close()


def test_the_page_refreshes_in_place_and_reloads_for_a_new_session(browser, gateway):
    context, page = open_page(browser, gateway)
    try:
        last_use = row(page, "team-bridge").locator("[data-f=last_used_at]")
        assert last_use.inner_text() == "never"
        page.evaluate("window.__notReloaded = true")
        assert chat(gateway, "team-bridge") == 200
        wait_for(lambda: last_use.inner_text() != "never", 20, what="the refreshed last use")
        assert page.evaluate("window.__notReloaded") is True  # rewritten in place
        assert "ago" in last_use.inner_text() or last_use.inner_text() == "just now"
        # a session that was not there: the page reloads to show its row
        register(gateway, "team-new")
        row(page, "team-new").wait_for(timeout=20000)
        assert page.evaluate("window.__notReloaded") is None
    finally:
        context.close()


def test_delete_asks_then_works_and_an_action_without_the_csrf_token_is_refused(browser, gateway):
    context, page = open_page(browser, gateway)
    try:
        questions = []
        # first the operator says no: nothing happens
        page.once("dialog", lambda dialog: (questions.append(dialog.message), dialog.dismiss()))
        row(page, "team-broken").get_by_role("button", name="Delete").click()
        wait_for(lambda: questions, 10, what="the confirm")
        assert "Delete session team-broken on lmarena.ai?" in questions[0]
        assert session_in(report(gateway), "team-broken")
        # without the CSRF token, from the page itself: refused, nothing changes
        refused = page.evaluate("""async () => {
            const r = await fetch("status/delete", {method: "POST", body: new URLSearchParams(
                {domain: "lmarena.ai", session_name: "team-broken", confirm: "yes"})});
            return [r.status, (await r.json()).error.code];
        }""")
        assert refused == [403, "CSRF_TOKEN_REQUIRED"]
        assert session_in(report(gateway), "team-broken")
        # then yes: the session is gone
        page.once("dialog", lambda dialog: dialog.accept())
        row(page, "team-broken").get_by_role("button", name="Delete").click()
        page.get_by_role("heading", name="Session deleted").wait_for(timeout=10000)
        names = [s["session_name"] for s in report(gateway)["sessions"]]
        assert "team-broken" not in names and "team-bridge" in names
        page.get_by_role("link", name="Back to the status page").click()
        row(page, "team-bridge").wait_for(timeout=10000)
        assert row(page, "team-broken").count() == 0
    finally:
        context.close()


def test_the_install_link_action_shows_a_link_that_installs(browser, gateway):
    context, page = open_page(browser, gateway)
    try:
        page.once("dialog", lambda dialog: dialog.accept())
        row(page, "team-bridge").get_by_role("button", name="Install link").click()
        link = page.locator("#install-link")
        link.wait_for(timeout=10000)
        href = link.get_attribute("href")
        assert href == f"{gateway.url}/userscript/team-bridge.user.js"
        # the link asks for the admin token, and with it serves the script
        assert http("GET", href)[0] == 401
        basic = base64.b64encode(f"admin:{ADMIN}".encode()).decode()
        status, _, script = http("GET", href, headers={"Authorization": f"Basic {basic}"})
        assert status == 200 and b"// ==UserScript==" in script
    finally:
        context.close()


def test_without_an_admin_token_the_page_and_its_actions_work_from_this_machine(
        browser, daemon_factory, fake_bridge_process):
    # local-only refuses web pages, but not the status page posting to its own origin
    gateway = daemon_factory("--bridge-url", fake_bridge_process)
    status, _, answer = http("POST", gateway.url + "/session/register", {
        "domain": "lmarena.ai", "session_name": "team-local", "session_id": SID, "message_id": MID})
    assert status == 200, answer
    context = browser.new_context()
    try:
        page = context.new_page()
        assert page.goto(gateway.url + "/status").status == 200
        page.once("dialog", lambda dialog: dialog.accept())
        row(page, "team-local").get_by_role("button", name="Delete").click()
        page.get_by_role("heading", name="Session deleted").wait_for(timeout=10000)
        assert http("GET", gateway.url + "/status.json")[2]["sessions"] == []
    finally:
        context.close()


def test_the_page_renders_a_tab_session_with_its_connected_tab(browser, gateway):
    """A tab says hello over the tab channel (as the userscript does); the page shows it."""
    status, _, script = http("GET", gateway.url + "/userscript/team-tab.user.js", headers=AUTH)
    assert status == 200
    token = json.loads(re.search(r"var REGISTRATION_TOKEN = (.*?);", script.decode()).group(1))
    status, _, answer = http("POST", gateway.url + "/tab/connect", {
        "session_name": "team-tab", "domain": "arena.ai", "registration_token": token,
        "tab_id": "tab-status-0001", "models_source": ""})
    assert status == 200, answer
    context, page = open_page(browser, gateway)
    try:
        tab_row = page.locator("tr[id='s-arena.ai-team-tab']")
        assert tab_row.locator("[data-f=served_by]").inner_text() == "tab"
        assert tab_row.locator("[data-f=connected]").inner_text() == "yes"
        assert "tab-status-0001" in tab_row.inner_text()
        assert token not in page.content()
    finally:
        context.close()
