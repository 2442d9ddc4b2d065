"""The registration userscript in real headless Chromium, against a real gateway daemon.

Pages are served by the test on loopback under the names lmarena.ai, canary.lmarena.ai and
other.example (Chromium's --host-resolver-rules). The script is injected at document start
as the extension would inject it, and ``GM_xmlhttpRequest`` is a Playwright binding that
makes the request outside the page, as the extension's does. The page's own code makes the
retry call; the test server answers it, so the test sees it went through unchanged.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmarena_gateway.userscript import render_script

from support.browser import launched_chromium
from support.processes import free_port, http, wait_for

NAME = "team-alpha"
DOMAINS = "lmarena.ai,canary.lmarena.ai"
SID_A, MID_A = "AAAAAAAA-1111-4111-8111-AAAAAAAAAAAA", "BBBBBBBB-2222-4222-8222-BBBBBBBBBBBB"
SID_B, MID_B = "cccccccc-3333-4333-8333-cccccccccccc", "dddddddd-4444-4444-8444-dddddddddddd"
SID_C, MID_C = "eeeeeeee-5555-4555-8555-eeeeeeeeeeee", "ffffffff-6666-4666-8666-ffffffffffff"
MARK = "#lmarena-registrar-mark"
CHROMIUM_ARGS = [  # beside support.browser's headless flags
    "--host-resolver-rules=MAP lmarena.ai 127.0.0.1, MAP canary.lmarena.ai 127.0.0.1, "
    "MAP other.example 127.0.0.1",
]

# The page's own code: the retry call made with fetch(string), fetch(URL), fetch(Request), XHR.
PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>arena</title></head><body><p>arena</p><script>
function retryPath(form, sid, mid) {
  return "/" + form + "/stream/retry-evaluation-session-message/" + sid + "/messages/" + mid;
}
function init(how) {
  return {method: "POST", headers: {"Content-Type": "application/json", "X-Page": how},
          body: JSON.stringify({how: how})};
}
async function answer(r) { return {status: r.status, body: await r.json()}; }
async function viaFetch(form, sid, mid) {
  return answer(await fetch(retryPath(form, sid, mid), init("fetch")));
}
async function viaURL(form, sid, mid) {
  return answer(await fetch(new URL(retryPath(form, sid, mid), location.href), init("url")));
}
async function viaRequest(form, sid, mid) {
  return answer(await fetch(new Request(retryPath(form, sid, mid), init("request"))));
}
function viaXHR(form, sid, mid) {
  return new Promise(function (resolve) {
    var x = new XMLHttpRequest();
    x.open("POST", retryPath(form, sid, mid));
    x.setRequestHeader("Content-Type", "application/json");
    x.setRequestHeader("X-Page", "xhr");
    x.onload = function () { resolve({status: x.status, body: JSON.parse(x.responseText)}); };
    x.onerror = function () { resolve({status: 0, body: null}); };
    x.send(JSON.stringify({how: "xhr"}));
  });
}
</script></body></html>
"""

# How the extension provides GM_xmlhttpRequest: a function in the script's scope whose
# request is made outside the page (here by the test, through a Playwright binding).
GM_WRAPPER = """(function () {
  var GM_xmlhttpRequest = function (details) {
    window.__lmgwGM(JSON.stringify({method: details.method, url: details.url,
                                    headers: details.headers || {}, data: details.data}))
      .then(function (r) {
        if (r.error) { if (details.onerror) { details.onerror({error: r.error}); } }
        else if (details.onload) { details.onload({status: r.status, responseText: r.text}); }
      });
  };
  var unsafeWindow = window;
%s
})();
"""


class PageHandler(BaseHTTPRequestHandler):
    """Serves the page at / and answers every retry call with what it received."""

    def do_GET(self):
        self._reply(200, "text/html; charset=utf-8", PAGE)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        echo = {"method": self.command, "path": self.path,
                "body": self.rfile.read(length).decode(), "x_page": self.headers.get("X-Page")}
        self._reply(200, "application/json", json.dumps(echo).encode())

    def _reply(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def page_port():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    yield from launched_chromium(*CHROMIUM_ARGS)


@pytest.fixture
def gateway(daemon_factory, page_port):
    # the fetch fallback posts from the test pages' http:// origins, so they are listed
    origins = ",".join(f"http://{d}:{page_port}" for d in DOMAINS.split(","))
    return daemon_factory("--domains", DOMAINS, "--cors-origins", origins, "--log-requests")


class Browsing:
    """One browser context with the userscript installed, as a user's profile would have."""

    def __init__(self, browser, page_port: int, script: str, *, gm: bool) -> None:
        self.page_port = page_port
        self.gm_calls: list[dict] = []
        self.console: list[str] = []
        self.context = browser.new_context()
        if gm:
            self.context.expose_binding("__lmgwGM", self._gm_request)
            self.context.add_init_script(GM_WRAPPER % script)
        else:
            self.context.add_init_script(script)

    def _gm_request(self, source, details_json: str) -> dict:
        details = json.loads(details_json)
        if "/tab/" in details["url"]:
            # Tab mode has its own tests (test_tab_browser); this sync binding cannot hold
            # a long poll, so the tab's channel is "unreachable" here.
            return {"error": "tab mode is not part of these tests"}
        self.gm_calls.append(details)
        request = urllib.request.Request(details["url"], method=details["method"],
                                         data=(details["data"] or "").encode(),
                                         headers=details["headers"])
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return {"status": response.status, "text": response.read().decode()}
        except urllib.error.HTTPError as e:
            return {"status": e.code, "text": e.read().decode()}
        except OSError as e:
            return {"error": str(e)}

    def open(self, host: str):
        page = self.context.new_page()
        page.on("console", lambda message: self.console.append(message.text))
        page.goto(f"http://{host}:{self.page_port}/")
        return page

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def browsing(browser, page_port):
    opened = []

    def make(script: str, *, gm: bool = True) -> Browsing:
        session = Browsing(browser, page_port, script, gm=gm)
        opened.append(session)
        return session

    yield make
    for session in opened:
        session.close()


def served_script(gateway) -> str:
    status, headers, body = http("GET", f"{gateway.url}/userscript/generate?session_name={NAME}")
    assert status == 200, body
    return body.decode()


def posted_body(script: str, domain: str, sid: str, mid: str) -> dict:
    """What the script posts for these ids: the four fields, and its token if it has one."""
    body = {"domain": domain, "session_name": NAME,
            "session_id": sid.lower(), "message_id": mid.lower()}
    token = json.loads(re.search(r"^  var REGISTRATION_TOKEN = (.*);$", script, re.M).group(1))
    if token is not None:
        body["registration_token"] = token
    return body


def retry(page, how: str, form: str, sid: str, mid: str) -> None:
    """The page's retry call; asserts it reached the page's server unchanged and was answered."""
    result = page.evaluate("([how, form, sid, mid]) => window[how](form, sid, mid)",
                           [how, form, sid, mid])
    tag = {"viaFetch": "fetch", "viaURL": "url", "viaRequest": "request", "viaXHR": "xhr"}[how]
    assert result == {"status": 200, "body": {
        "method": "POST", "path": f"/{form}/stream/retry-evaluation-session-message/{sid}/messages/{mid}",
        "body": json.dumps({"how": tag}, separators=(",", ":")), "x_page": tag}}


def stored(gateway, domain: str) -> dict:
    status, _, body = http("GET", f"{gateway.url}/session/list?domain={domain}")
    assert status == 200
    return body["domains"][domain]


def wait_registered(gateway, domain: str, sid: str, mid: str) -> dict:
    def found():
        record = stored(gateway, domain).get(NAME)
        if record and (record["session_id"], record["message_id"]) == (sid.lower(), mid.lower()):
            return record
        return None

    return wait_for(found, 15, what=f"{sid}/{mid} registered under {domain}/{NAME}")


def registrations(gateway) -> int:
    """POST /session/register requests the daemon has answered, once it has caught up.

    A /health request sent now is answered after every request already received, and
    the request log is written in that order, so its line marks the end of the count.
    """
    before = gateway.log().count("GET /health ")
    assert http("GET", gateway.url + "/health")[0] == 200
    wait_for(lambda: gateway.log().count("GET /health ") > before, 10, what="the barrier's log line")
    return gateway.log().count("POST /session/register ")


def test_fetch_registers_lowercased_ids_under_the_page_domain(browsing, gateway):
    script = served_script(gateway)
    session = browsing(script)
    page = session.open("lmarena.ai")
    retry(page, "viaFetch", "nextjs-api", SID_A, MID_A)
    record = wait_registered(gateway, "lmarena.ai", SID_A, MID_A)
    assert record["session_name"] == NAME and record["domain"] == "lmarena.ai"
    assert stored(gateway, "canary.lmarena.ai") == {}
    assert [json.loads(call["data"]) for call in session.gm_calls] == [
        posted_body(script, "lmarena.ai", SID_A, MID_A)]
    assert session.gm_calls[0]["url"] == gateway.url + "/session/register"
    # what the user sees: a mark on the page that goes away by itself, and a console line
    mark = page.locator(MARK)
    mark.wait_for(state="visible", timeout=5000)
    assert mark.get_attribute("data-outcome") == "ok" and NAME in mark.inner_text()
    assert any(line.startswith("[lmarena-registrar] registered session") and SID_A.lower() in line
               for line in session.console)
    mark.wait_for(state="detached", timeout=10000)


def test_url_request_and_xhr_calls_register_on_canary(browsing, gateway):
    page = browsing(served_script(gateway)).open("canary.lmarena.ai")
    retry(page, "viaURL", "api", SID_A, MID_A)
    wait_registered(gateway, "canary.lmarena.ai", SID_A, MID_A)
    retry(page, "viaRequest", "api", SID_B, MID_B)
    wait_registered(gateway, "canary.lmarena.ai", SID_B, MID_B)
    retry(page, "viaXHR", "nextjs-api", SID_C, MID_C)
    wait_registered(gateway, "canary.lmarena.ai", SID_C, MID_C)
    assert stored(gateway, "lmarena.ai") == {}


def test_a_repeated_retry_registers_once(browsing, gateway):
    session = browsing(served_script(gateway))
    page = session.open("lmarena.ai")
    retry(page, "viaFetch", "nextjs-api", SID_A, MID_A)
    wait_registered(gateway, "lmarena.ai", SID_A, MID_A)
    # the same message again, in other ways and other case: the page's calls all go through
    retry(page, "viaRequest", "nextjs-api", SID_A, MID_A)
    retry(page, "viaXHR", "api", SID_A.lower(), MID_A.lower())
    retry(page, "viaFetch", "nextjs-api", SID_A, MID_A)
    # a new message registers: GM requests run one at a time, so a repeat would be before it
    retry(page, "viaFetch", "nextjs-api", SID_B, MID_B)
    wait_registered(gateway, "lmarena.ai", SID_B, MID_B)
    assert registrations(gateway) == 2
    assert len(session.gm_calls) == 2


def test_fetch_fallback_without_gm_xmlhttprequest(browsing, gateway):
    session = browsing(served_script(gateway), gm=False)
    page = session.open("lmarena.ai")
    assert page.evaluate("typeof window.__lmgwGM") == "undefined"
    retry(page, "viaXHR", "nextjs-api", SID_A, MID_A)
    wait_registered(gateway, "lmarena.ai", SID_A, MID_A)
    page.locator(f"{MARK}[data-outcome=ok]").wait_for(timeout=5000)
    assert registrations(gateway) == 1


def test_a_page_on_another_host_registers_nothing(browsing, gateway):
    session = browsing(served_script(gateway))
    other = session.open("other.example")
    retry(other, "viaFetch", "nextjs-api", SID_A, MID_A)
    retry(other, "viaRequest", "api", SID_A, MID_A)
    retry(other, "viaXHR", "nextjs-api", SID_A, MID_A)
    # the positive control: the same page and script on lmarena.ai registers
    arena = session.open("lmarena.ai")
    retry(arena, "viaFetch", "nextjs-api", SID_B, MID_B)
    wait_registered(gateway, "lmarena.ai", SID_B, MID_B)
    assert registrations(gateway) == 1
    assert [json.loads(call["data"])["session_id"] for call in session.gm_calls] == [SID_B]
    assert other.locator(MARK).count() == 0
    status, _, body = http("GET", gateway.url + "/session/list")
    assert sum(len(names) for names in body["domains"].values()) == 1


def test_a_refused_registration_shows_the_gateways_message_and_is_retried(browsing, gateway):
    # a script that believes in a domain the gateway does not serve: the gateway says 400
    script = render_script(session_name=NAME, gateway_url=gateway.url,
                           domains=("lmarena.ai", "other.example"), registration_token="tok")
    session = browsing(script)
    page = session.open("other.example")
    retry(page, "viaFetch", "nextjs-api", SID_A, MID_A)
    mark = page.locator(f"{MARK}[data-outcome=error]")
    mark.wait_for(timeout=5000)
    assert "domain must be one of: lmarena.ai, canary.lmarena.ai" in mark.inner_text()
    wait_for(lambda: any("registration as \"team-alpha\" failed: domain must be one of" in line
                         for line in session.console), 5, what="the console line")
    assert json.loads(session.gm_calls[0]["data"])["registration_token"] == "tok"
    # a failure is not remembered: the next retry of the same message tries again
    retry(page, "viaFetch", "nextjs-api", SID_A, MID_A)
    wait_for(lambda: len(session.gm_calls) == 2, 5, what="the second attempt")
    assert registrations(gateway) == 2
    assert "POST /session/register 400" in gateway.log()


@pytest.mark.parametrize("gm", [True, False], ids=["gm", "fetch"])
def test_the_page_request_goes_ahead_when_the_gateway_is_down(browsing, gm):
    script = render_script(session_name=NAME, gateway_url=f"http://127.0.0.1:{free_port()}",
                           domains=("lmarena.ai",))
    session = browsing(script, gm=gm)
    page = session.open("lmarena.ai")
    for how in ("viaFetch", "viaRequest", "viaXHR"):
        retry(page, how, "nextjs-api", SID_A, MID_A)
    mark = page.locator(f"{MARK}[data-outcome=error]")
    mark.wait_for(timeout=10000)
    assert "could not be reached" in mark.inner_text()
