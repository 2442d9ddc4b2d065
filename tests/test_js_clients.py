"""Node clients, as their users set them up: the openai Node SDK and the Vercel AI SDK in
Node, and the openai SDK bundled into a page in headless Chromium on another origin.

Their versions are pinned in tests/js/package.json and package-lock.json; the
``js_clients`` fixture runs ``npm ci`` once when tests/js/node_modules is missing.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lmarena_gateway.fakebridge import TEXT

from support.client import SESSION
from support.processes import REQUIRE_ALL, free_port, http, require_binary

JS = Path(__file__).parent / "js"
pytestmark = pytest.mark.process


@pytest.fixture(scope="session")
def js_clients() -> Path:
    node = require_binary("node", "nodejs")
    npm = require_binary("npm")
    lock = JS / "package-lock.json"
    installed = JS / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS,
                       check=True, timeout=300)
    return Path(node)


def gateway_for(daemon_factory, bridge_url: str, *args):
    daemon = daemon_factory("--bridge-url", bridge_url, *args)
    status, _, _ = http("POST", daemon.url + "/session/register",
                        dict(SESSION, models={"gpt-4": "fake-model"}))
    assert status == 200
    return daemon


def run_node(node: Path, scenario: str, base_url: str) -> dict:
    result = subprocess.run([str(node), str(JS / "clients.mjs"), scenario, base_url],
                            capture_output=True, text=True, timeout=120, cwd=JS)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def upstream_errors(url: str, code: str) -> float:
    _, _, body = http("GET", url + "/metrics")
    found = re.findall(rf'^lmgateway_upstream_errors_total{{code="{code}"}} (\S+)$',
                       body.decode(), re.M)
    return float(found[0]) if found else 0.0


def test_openai_node_sdk(js_clients, daemon_factory, fake_bridge_process):
    gw = gateway_for(daemon_factory, fake_bridge_process)
    seen = run_node(js_clients, "openai-node", gw.url + "/v1")
    assert seen["chat"] == TEXT and seen["streamed"] == TEXT
    assert seen["usage"]["total_tokens"] == 9  # the fake bridge's usage chunk, passed on
    assert seen["model"] == "gpt-4"
    assert seen["responses"] == TEXT and seen["deltas"] == TEXT
    assert seen["events"][0] == "response.created" and seen["events"][-1] == "response.completed"
    assert seen["responsesUsage"]["output_tokens"] == 8
    assert seen["missing"]["status"] == 404 and seen["missing"]["code"] == "MODEL_NOT_FOUND"
    assert seen["retried"]["status"] == 503 and seen["retried"]["code"] == "BRIDGE_NOT_READY"
    # maxRetries: 3, yet the bridge was asked once: x-should-retry: false was honoured
    assert upstream_errors(gw.url, "BRIDGE_NOT_READY") == 1


def test_vercel_ai_sdk_default_provider(js_clients, daemon_factory, fake_bridge_process):
    gw = gateway_for(daemon_factory, fake_bridge_process)
    seen = run_node(js_clients, "ai-sdk", gw.url + "/v1")
    assert seen["text"] == TEXT  # openai(model): the Responses API
    assert seen["finishReason"] == "stop"
    assert seen["usage"]["inputTokens"] == 1 and seen["usage"]["outputTokens"] == 8
    assert len(seen["parts"]) > 1 and "".join(seen["parts"]) == TEXT == seen["streamedText"]
    assert seen["chat"] == TEXT  # openai.chat(model): chat completions
    assert seen["refused"]["status"] == 400  # tools: refused by name, not dropped
    assert "UNSUPPORTED_TOOLS" in seen["refused"]["body"]


# --- in Chromium, from another origin ---


class _Page(BaseHTTPRequestHandler):
    bundle = b""

    def do_GET(self):
        if self.path == "/bundle.js":
            body, kind = self.bundle, "text/javascript"
        else:
            body = b'<!doctype html><meta charset="utf-8"><script src="/bundle.js"></script>'
            kind = "text/html"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def bundled_page(js_clients, tmp_path):
    out = tmp_path / "bundle.js"
    subprocess.run([str(JS / "node_modules" / ".bin" / "esbuild"), "browser-entry.mjs",
                    "--bundle", "--format=iife", "--platform=browser",
                    f"--outfile={out}", "--log-level=warning"], cwd=JS, check=True, timeout=120)
    handler = type("Page", (_Page,), {"bundle": out.read_bytes()})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.browser
def test_openai_sdk_bundled_into_a_page_in_chromium(bundled_page, daemon_factory,
                                                    fake_bridge_process):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        message = "playwright is not installed (pip install '.[test]')"
        pytest.fail(message) if REQUIRE_ALL else pytest.skip(message)
    chromium = require_binary("chromium")
    gw = gateway_for(daemon_factory, fake_bridge_process, "--cors-origins", bundled_page)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update"])
        try:
            page = browser.new_page()
            page.goto(bundled_page + "/")
            seen = page.evaluate("url => window.runClient(url)", gw.url + "/v1")
        finally:
            browser.close()
    assert seen == {"chat": TEXT, "streamed": TEXT, "responses": TEXT, "model": "gpt-4"}
