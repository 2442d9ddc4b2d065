"""No web page reads the admin routes, in real headless Chromium against a real daemon.

A page on another origin (other.example, mapped to loopback) tries every admin route with
fetch, and the userscript with a <script> tag; a DNS-rebinding page (rebind.example,
resolving to the gateway's own address) loads them same-origin. Neither gets anything.
With an admin token and the page's origin listed, the same fetch works: the refusals are
the rule, not a broken browser.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from support.browser import launched_chromium
from support.client import SESSION
from support.processes import free_port, http

ADMIN = "browser-admin-token-0123456789"
CHROMIUM_ARGS = [  # beside support.browser's headless flags
    "--host-resolver-rules=MAP other.example 127.0.0.1, MAP rebind.example 127.0.0.1",
]
ADMIN_READS = ["/session/list", "/metrics", "/userscript/generate?session_name=team-alpha",
               "/userscript/team-alpha.user.js"]

# What a hostile page runs: can it read the answer, and did a DELETE go through?
READ = """async ([url, headers]) => {
  try {
    const r = await fetch(url, {headers: headers});
    return {read: true, status: r.status, text: (await r.text()).slice(0, 200)};
  } catch (e) { return {read: false, error: String(e)}; }
}"""
DELETE = """async (url) => {
  try { const r = await fetch(url, {method: "DELETE"}); return {read: true, status: r.status}; }
  catch (e) { return {read: false, error: String(e)}; }
}"""
SCRIPT_TAG = """(url) => new Promise((resolve) => {
  const s = document.createElement("script");
  s.src = url;
  s.onload = () => resolve("loaded");
  s.onerror = () => resolve("refused");
  document.head.appendChild(s);
})"""


class BlankPage(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"<!doctype html><title>elsewhere</title><p>another site</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def page_port():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), BlankPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    yield from launched_chromium(*CHROMIUM_ARGS)


@pytest.fixture
def page(browser, page_port):
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"http://other.example:{page_port}/")
    yield page
    context.close()


def registered(daemon, headers=None):
    status, _, _ = http("POST", daemon.url + "/session/register", SESSION, headers=headers)
    assert status == 200


def test_a_page_on_another_origin_reads_no_admin_route(daemon_factory, page):
    daemon = daemon_factory()  # the defaults: no admin token, --cors-origins *
    registered(daemon)
    for path in ADMIN_READS:
        assert http("GET", daemon.url + path)[0] == 200, path  # a local tool is an admin
        result = page.evaluate(READ, [daemon.url + path, {}])
        assert result["read"] is False, (path, result)
    result = page.evaluate(DELETE, daemon.url + "/session/lmarena.ai/team-alpha")
    assert result["read"] is False
    status, _, listing = http("GET", daemon.url + "/session/list")
    assert "team-alpha" in listing["domains"]["lmarena.ai"]  # and nothing was deleted


def test_a_page_cannot_run_the_userscript_from_a_script_tag(daemon_factory, page):
    daemon = daemon_factory()
    url = daemon.url + "/userscript/generate?session_name=team-alpha"
    assert page.evaluate(SCRIPT_TAG, url) == "refused"


def test_a_rebinding_host_gets_403(daemon_factory, browser):
    daemon = daemon_factory()
    registered(daemon)
    context = browser.new_context()
    try:
        page = context.new_page()
        for path in ADMIN_READS:
            # rebind.example now resolves to the gateway: the page is "same-origin" with it
            response = page.goto(f"http://rebind.example:{daemon.port}{path}")
            assert response.status == 403, path
            assert "HOST_NOT_ALLOWED" in response.text()
        assert page.goto(f"http://localhost:{daemon.port}/session/list").status == 200
    finally:
        context.close()


def test_a_listed_origin_with_the_admin_token_may_read(daemon_factory, page, page_port):
    origin = f"http://other.example:{page_port}"
    daemon = daemon_factory("--cors-origins", origin, env={"GATEWAY_ADMIN_TOKEN": ADMIN})
    registered(daemon, {"Authorization": f"Bearer {ADMIN}"})
    result = page.evaluate(READ, [daemon.url + "/session/list", {"Authorization": f"Bearer {ADMIN}"}])
    assert result["read"] is True and result["status"] == 200
    assert "team-alpha" in result["text"]


def test_star_never_opens_admin_routes_even_with_a_token(daemon_factory, page):
    daemon = daemon_factory("--cors-origins", "*", env={"GATEWAY_ADMIN_TOKEN": ADMIN})
    result = page.evaluate(READ, [daemon.url + "/session/list", {"Authorization": f"Bearer {ADMIN}"}])
    assert result["read"] is False
    # while the OpenAI routes stay open to browser SDKs, as --cors-origins says
    result = page.evaluate(READ, [daemon.url + "/health", {}])
    assert result["read"] is True
