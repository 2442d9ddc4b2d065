"""The status page's parts in memory: the window, the activity, the probe, the report,
the actions and their CSRF tokens. Clock for time, StubTreq for HTTP."""

from __future__ import annotations

import base64
import json
import re

import pytest
from attrs import evolve
from treq.testing import StubTreq
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lmarena_gateway.bridge import Upstream
from lmarena_gateway.config import GatewayConfig
from lmarena_gateway.gateway import Gateway
from lmarena_gateway.sessions import SessionRecord
from lmarena_gateway.site import make_site
from lmarena_gateway.status import ITabSource, SessionTabsView, StatusPages, TabView
from lmarena_gateway.status.actions import CsrfTokens
from lmarena_gateway.status.activity import Activity, RollingWindow
from lmarena_gateway.status.gather import NoTabs
from lmarena_gateway.status.page import fmt
from lmarena_gateway.status.probe import BridgeProber
from lmarena_gateway.store.cache import CachedSessions
from lmarena_gateway.tokens import RegistrationTokens

T0 = 1_790_000_000.0
SID = "12345678-1234-1234-1234-123456789abc"
MID = "87654321-4321-4321-4321-cba987654321"
BRIDGE_KEY = "sk-bridge-secret-abcdef"
ADMIN = "admin-token-0123456789"


class MemoryStore(CachedSessions, Service):
    backend = "memory"

    def health(self) -> dict:
        return {"backend": self.backend, "status": "ok", "sessions": len(self._cache)}

    def add(self, domain: str, name: str, **fields) -> SessionRecord:
        record = SessionRecord(domain, name, SID, MID, created_at=T0, updated_at=T0, **fields)
        self._cache[record.key] = record
        return record

    def delete(self, domain: str, name: str):
        return succeed(self._cache.pop(f"{domain}/{name}", None) is not None)


class MemorySecrets:
    def __init__(self) -> None:
        self.generations: dict[str, int] = {}

    def read(self):
        return b"s" * 32, dict(self.generations)

    def refresh(self):
        return succeed(self.read())

    def revoke(self, name: str):
        self.generations[name] = self.generations.get(name, 0) + 1
        return succeed(self.generations[name])


def clock_at(seconds: float = T0) -> Clock:
    clock = Clock()
    clock.advance(seconds)
    return clock


class FakeRequest:
    """What Activity reads from a request."""

    def __init__(self, path: bytes, method: bytes = b"POST", code: int = 200,
                 headers: dict | None = None, error_code: str | None = None) -> None:
        self.path, self.method, self.code = path, method, code
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        if error_code is not None:
            self.error_code = error_code

    def getHeader(self, name: bytes):
        return self.headers.get(name.lower())


TEAM_A = {b"X-Session-Name": b"team-a", b"X-Target-Domain": b"lmarena.ai"}


# --- the 5-minute window ---

def test_the_window_counts_the_last_five_minutes_only():
    clock = clock_at()
    window = RollingWindow(clock)
    window.add()
    window.add(error=True)
    clock.advance(200)
    window.add(client_error=True)
    assert (window.totals().requests, window.totals().errors,
            window.totals().client_errors) == (3, 1, 1)
    clock.advance(110)  # the first two are now 310 s old
    assert (window.totals().requests, window.totals().errors) == (1, 0)
    clock.advance(300)
    assert window.totals().requests == 0


# --- activity ---

def test_open_streams_follow_requests_per_session_and_only_for_known_sessions():
    activity = Activity(clock_at(), lambda domain, name: name == "team-a")
    first = FakeRequest(b"/v1/chat/completions", headers=TEAM_A)
    second = FakeRequest(b"/v1/chat/completions", headers=TEAM_A)
    stranger = FakeRequest(b"/v1/chat/completions", headers={b"X-Session-Name": b"nobody"})
    for request in (first, second, stranger):
        activity.started(request)
    assert activity.open == {("lmarena.ai", "team-a"): 2}
    assert activity.open_streams == 2
    activity.finished(first, False)
    assert activity.open == {("lmarena.ai", "team-a"): 1}
    activity.finished(second, True)
    activity.finished(stranger, False)
    assert activity.open == {} and activity.open_streams == 0


def test_errors_are_classified_and_remembered_per_session():
    clock = clock_at()
    activity = Activity(clock, lambda domain, name: name == "team-a")
    cases = [
        FakeRequest(b"/v1/chat/completions", code=200, headers=TEAM_A),
        FakeRequest(b"/v1/chat/completions", code=502, headers=TEAM_A, error_code="BRIDGE_ERROR"),
        # a stream that started fine and ended with an error event
        FakeRequest(b"/v1/chat/completions", code=200, headers=TEAM_A, error_code="BRIDGE_STREAM_LOST"),
        FakeRequest(b"/session/register", code=400, error_code="INVALID_UUID"),
        FakeRequest(b"/v1/models", method=b"GET", code=404, error_code="SESSION_NOT_FOUND",
                    headers={b"X-Session-Name": b"nobody"}),
        # monitoring is not traffic
        FakeRequest(b"/status.json", method=b"GET"),
        FakeRequest(b"/health", method=b"GET", code=503),
    ]
    for request in cases:
        activity.started(request)
        clock.advance(1)
        activity.finished(request, False)
    totals = activity.window.totals()
    assert (totals.requests, totals.errors, totals.client_errors) == (5, 2, 2)
    last = activity.last_errors[("lmarena.ai", "team-a")]
    assert (last.code, last.at) == ("BRIDGE_STREAM_LOST", T0 + 3)
    assert list(activity.last_errors) == [("lmarena.ai", "team-a")]


def test_a_client_that_left_is_counted_but_not_as_an_error():
    activity = Activity(clock_at())
    request = FakeRequest(b"/v1/chat/completions", headers=TEAM_A)
    activity.started(request)
    activity.finished(request, True)
    totals = activity.window.totals()
    assert (totals.requests, totals.errors, totals.client_errors) == (1, 0, 0)
    assert activity.last_errors == {}


# --- the bridge probe ---

class ProbeClient:
    """A treq-like client whose answers the test decides per bridge URL."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict]] = []
        self.answers: dict[str, object] = {}
        self.pending: list[Deferred] = []

    def request(self, method, url, *, headers=None, **kwargs):
        self.calls.append((method, url, dict(headers.getAllRawHeaders()) if headers else {}))
        answer = self.answers.get(url.rsplit("/v1/", 1)[0], "hang")
        if answer == "hang":
            d = Deferred()
            self.pending.append(d)
            return d
        if isinstance(answer, Exception):
            return fail(answer)
        status, body = answer
        return succeed(_Response(status, body))


class _Response:
    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self.body = body

    def deliverBody(self, protocol) -> None:
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseDone

        protocol.transport = _NoTransport()
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class _NoTransport:
    def stopProducing(self) -> None:
        pass


MODELS = json.dumps({"object": "list", "data": [{"id": "m"}]}).encode()
DEFAULT = "http://127.0.0.1:5102"
OTHER = "http://127.0.0.1:6000"


def prober_with(store, client, clock, **config):
    config = evolve(GatewayConfig(), **config)
    return BridgeProber(config, store, client, clock)


def test_each_distinct_bridge_is_probed_at_most_once_a_minute():
    clock, store, client = clock_at(), MemoryStore(), ProbeClient()
    client.answers = {DEFAULT: (200, MODELS), OTHER: (200, MODELS)}
    store.add("lmarena.ai", "team-a")  # the default bridge
    store.add("lmarena.ai", "team-b", bridge_base_url=OTHER, bridge_api_key=BRIDGE_KEY)
    store.add("lmarena.ai", "team-c", bridge_base_url=OTHER, bridge_api_key=BRIDGE_KEY)
    prober = prober_with(store, client, clock)
    prober()
    assert sorted(url for _, url, _ in client.calls) == [DEFAULT + "/v1/models", OTHER + "/v1/models"]
    for _ in range(11):  # ticks every 5 s for 55 s: nothing new
        clock.advance(5)
        prober()
    assert len(client.calls) == 2
    clock.advance(5)
    prober()
    assert len(client.calls) == 4
    # the session's key goes to its own bridge, and no key to the default one
    keyed = {url: headers.get(b"Authorization") for _, url, headers in client.calls}
    assert keyed[OTHER + "/v1/models"] == [b"Bearer " + BRIDGE_KEY.encode()]
    assert keyed[DEFAULT + "/v1/models"] is None
    assert prober.bridges() == {Upstream(DEFAULT): 1, Upstream(OTHER, BRIDGE_KEY): 2}


def test_a_new_bridge_is_probed_at_the_next_tick_not_after_a_minute():
    clock, store, client = clock_at(), MemoryStore(), ProbeClient()
    client.answers = {DEFAULT: (200, MODELS), OTHER: (200, MODELS)}
    prober = prober_with(store, client, clock)
    prober()
    store.add("lmarena.ai", "team-b", bridge_base_url=OTHER)
    clock.advance(5)
    prober()
    assert [url for _, url, _ in client.calls] == [DEFAULT + "/v1/models", OTHER + "/v1/models"]
    assert prober.result_for(Upstream(OTHER)).ok is True


@pytest.mark.parametrize("answer, code, status", [
    ((503, b'{"detail": "no tab"}'), "BRIDGE_NOT_READY", 503),
    ((401, b"no"), "BRIDGE_UNAUTHORIZED", 401),
    ((200, b"<html>"), "BRIDGE_BAD_RESPONSE", 200),
    ((200, b'{"data": 3}'), "BRIDGE_BAD_RESPONSE", 200),
    (ConnectionRefusedError(), "BRIDGE_ERROR", None),
])
def test_a_bridge_that_does_not_answer_properly_is_down(answer, code, status):
    clock, store, client = clock_at(), MemoryStore(), ProbeClient()
    client.answers = {DEFAULT: answer}
    prober = prober_with(store, client, clock)
    prober()
    result = prober.result_for(Upstream(DEFAULT))
    assert (result.ok, result.code, result.status) == (False, code, status)
    assert result.checked_at == T0


def test_a_silent_bridge_times_out_on_the_clock_and_since_tracks_changes():
    clock, store, client = clock_at(), MemoryStore(), ProbeClient()
    prober = prober_with(store, client, clock)
    prober()
    assert prober.result_for(Upstream(DEFAULT)) is None  # still waiting
    clock.advance(10)
    down = prober.result_for(Upstream(DEFAULT))
    assert (down.ok, down.code, down.since) == (False, "BRIDGE_TIMEOUT", T0 + 10)
    assert down.detail == "no answer in 10 s"
    clock.advance(50)
    client.answers = {DEFAULT: ConnectionRefusedError()}
    prober()
    still = prober.result_for(Upstream(DEFAULT))
    assert (still.code, still.detail) == ("BRIDGE_ERROR", "unreachable")
    assert (still.checked_at, still.since) == (T0 + 60, T0 + 10)
    clock.advance(60)
    client.answers = {DEFAULT: (200, MODELS)}
    prober()
    up = prober.result_for(Upstream(DEFAULT))
    assert (up.ok, up.since) == (True, T0 + 120)


def test_a_bridge_no_session_uses_is_forgotten_and_stopping_cancels_probes():
    clock, store, client = clock_at(), MemoryStore(), ProbeClient()
    client.answers = {DEFAULT: (200, MODELS), OTHER: (200, MODELS)}
    store.add("lmarena.ai", "team-b", bridge_base_url=OTHER)
    prober = prober_with(store, client, clock)
    prober()
    assert Upstream(OTHER) in prober.results
    store._cache.clear()
    clock.advance(60)
    client.answers = {}
    prober()
    assert set(prober.results) == {Upstream(DEFAULT)}
    prober.stop()
    assert client.pending[0].called
    assert prober.result_for(Upstream(DEFAULT)).ok is True  # a cancel is no outcome


def test_a_bridge_no_longer_allowed_is_not_probed():
    clock, store, client = clock_at(), MemoryStore(), ProbeClient()
    client.answers = {DEFAULT: (200, MODELS)}
    store.add("lmarena.ai", "team-x", bridge_base_url="http://bridge.example:5102")
    prober = prober_with(store, client, clock)
    prober()
    assert [url for _, url, _ in client.calls] == [DEFAULT + "/v1/models"]


# --- formats shared with page.js ---

@pytest.mark.parametrize("kind, value, text", [
    ("ago", "2026-09-21T14:13:15Z", "5 s ago"),
    ("ago", "2026-09-21T12:13:20Z", "2 h 0 min ago"),
    ("ago", None, "never"),
    ("since", "2026-09-21T14:10:20Z", "for 3 min"),
    ("duration", 90061, "1 d 1 h"),
    ("bytes", 3 * 1048576, "3.0 MiB"),
    ("probe", {"ok": False, "code": "BRIDGE_NOT_READY", "detail": "HTTP 503"},
     "no: BRIDGE_NOT_READY (HTTP 503)"),
    ("queue", None, ""),
])
def test_formats(kind, value, text):
    assert fmt(kind, value, "2026-09-21T14:13:20Z")[0] == text


# --- the whole page, in memory ---

@implementer(ITabSource)
class OneTab:
    def tabs_of(self, domain, name):
        if (domain, name) != ("arena.ai", "team-t"):
            return None
        return SessionTabsView((TabView("tab-1", T0 - 120, busy=True, last_error="RECAPTCHA",
                                        last_error_at=T0 - 30),), queued=2)


def test_tab_sources_provide_the_interface():
    assert verifyObject(ITabSource, NoTabs())
    assert verifyObject(ITabSource, OneTab())


class Harness:
    """A gateway over a memory store and a probe client, served through StubTreq."""

    def __init__(self, *, admin_token=None, tabs=None, **config) -> None:
        self.clock = clock_at()
        self.store = MemoryStore()
        self.probes = ProbeClient()
        self.probes.answers = {DEFAULT: (200, MODELS)}
        self.config = evolve(GatewayConfig(), admin_token=admin_token,
                             domains=("lmarena.ai", "arena.ai"), **config)
        self.tokens = RegistrationTokens(MemorySecrets(), self.clock)
        self.tokens._apply(self.tokens.source.read())
        self.prober = BridgeProber(self.config, self.store, self.probes, self.clock)
        self.status = StatusPages.build(self.config, self.store, self.clock, tokens=self.tokens,
                                        prober=self.prober, tabs=tabs)
        gateway = Gateway(self.config, self.store, None, self.clock, tokens=self.tokens,
                          status=self.status)
        self.client = StubTreq(make_site(gateway).resource)

    def request(self, method: str, path: str, *, form=None, headers=None):
        headers = dict(headers or {})
        data = None
        if form is not None:
            from urllib.parse import urlencode

            data = urlencode(form).encode()
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        done = []
        d = self.client.request(method, "http://127.0.0.1:8080" + path, data=data, headers=headers)
        d.addCallback(lambda r: self.client.content(r).addCallback(lambda body: done.append((r, body))))
        self.client.flush()
        assert done, "no answer"
        return done[0]

    def page(self, **kw) -> str:
        response, body = self.request("GET", "/status", **kw)
        assert response.code == 200, body
        return body.decode()

    def json(self, **kw) -> dict:
        response, body = self.request("GET", "/status.json", **kw)
        assert response.code == 200, body
        return json.loads(body)

    def csrf(self) -> str:
        return re.search(r'name="csrf" value="([^"]+)"', self.page()).group(1)


def iso(seconds: float) -> str:
    from lmarena_gateway.sessions import iso as to_iso

    return to_iso(seconds)


def test_status_json_has_the_documented_shape():
    h = Harness(tabs=OneTab())
    h.store.add("lmarena.ai", "team-a", last_used_at=T0 - 5)
    h.store.add("lmarena.ai", "team-b", bridge_base_url=OTHER, bridge_api_key=BRIDGE_KEY)
    h.store.add("arena.ai", "team-t")
    h.probes.answers[OTHER] = ConnectionRefusedError()
    h.prober()
    h.clock.advance(30)
    failing = FakeRequest(b"/v1/chat/completions", code=502,
                          headers={b"X-Session-Name": b"team-b"}, error_code="BRIDGE_ERROR")
    held = FakeRequest(b"/v1/chat/completions", headers=TEAM_A)
    for request in (failing, held):
        h.status.activity.started(request)
    h.status.activity.finished(failing, False)
    report = h.json()
    assert set(report) == {"generated_at", "gateway", "bridges", "sessions_total", "sessions"}
    assert report["generated_at"] == iso(T0 + 30)
    gateway = report["gateway"]
    assert set(gateway) == {"version", "started_at", "uptime_seconds", "memory", "open_streams",
                            "last_5_minutes", "store", "admin"}
    assert gateway["uptime_seconds"] == 30 and gateway["open_streams"] == 1
    assert gateway["last_5_minutes"] == {"requests": 1, "errors": 1, "client_errors": 0}
    assert gateway["memory"]["rss_bytes"] > 1_000_000
    assert gateway["store"] == {"backend": "memory", "status": "ok", "sessions": 3,
                                "last_prune": None}
    assert gateway["admin"] == "local-only"
    assert report["bridges"] == [
        {"url": DEFAULT, "default": True, "has_api_key": False, "sessions": 2,
         "probe": {"ok": True, "checked_at": iso(T0), "since": iso(T0), "code": None,
                   "detail": None, "status": 200, "latency_ms": report["bridges"][0]["probe"]["latency_ms"]}},
        {"url": OTHER, "default": False, "has_api_key": True, "sessions": 1,
         "probe": {"ok": False, "checked_at": iso(T0), "since": iso(T0),
                   "code": "BRIDGE_ERROR", "detail": "unreachable", "status": None,
                   "latency_ms": None}}]
    assert report["sessions_total"] == 3
    by_name = {s["session_name"]: s for s in report["sessions"]}
    assert [s["session_name"] for s in report["sessions"]] == ["team-t", "team-a", "team-b"]
    assert by_name["team-a"] == {
        "domain": "lmarena.ai", "session_name": "team-a", "served_by": "bridge",
        "bridge": DEFAULT, "bridge_answered": True, "connected": True,
        "connected_since": iso(T0), "busy": True, "queue_length": None,
        "last_used_at": iso(T0 - 5), "last_error": None, "open_streams": 1, "tabs": []}
    assert by_name["team-b"]["connected"] is False
    assert by_name["team-b"]["last_error"] == {"code": "BRIDGE_ERROR", "at": iso(T0 + 30)}
    assert by_name["team-b"]["busy"] is False
    assert by_name["team-t"] == {
        "domain": "arena.ai", "session_name": "team-t", "served_by": "tab",
        "bridge": DEFAULT, "bridge_answered": True, "connected": True,
        "connected_since": iso(T0 - 120), "busy": True, "queue_length": 2,
        "last_used_at": None, "last_error": {"code": "RECAPTCHA", "at": iso(T0 - 30)},
        "open_streams": 0,
        "tabs": [{"tab_id": "tab-1", "connected_since": iso(T0 - 120), "busy": True,
                  "last_error": "RECAPTCHA"}]}


def test_the_page_shows_the_state_and_no_secret():
    h = Harness(admin_token=ADMIN, tabs=OneTab())
    h.store.add("lmarena.ai", "team-b", bridge_base_url=OTHER, bridge_api_key=BRIDGE_KEY)
    h.store.add("arena.ai", "team-t")
    h.probes.answers[OTHER] = (503, b"{}")
    h.prober()
    auth = {"Authorization": "Basic " + base64.b64encode(f"admin:{ADMIN}".encode()).decode()}
    page = h.page(headers=auth)
    assert "no: BRIDGE_NOT_READY (HTTP 503)" in page
    assert "queue 2" in page and "tab tab-1" in page
    _, raw = h.request("GET", "/status.json", headers=auth)
    token = h.tokens.token_for("team-b")
    for text in (page, raw.decode()):
        assert BRIDGE_KEY not in text and ADMIN not in text and token not in text
        assert "lmrt1." not in text


def test_what_the_page_shows_is_escaped():
    h = Harness()
    h.store.add("lmarena.ai", "team-a")
    activity = h.status.activity
    activity.last_errors[("lmarena.ai", "team-a")] = type(
        "E", (), {"code": "<script>alert(1)</script>", "at": T0})()
    page = h.page()
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_the_page_needs_the_admin_token_as_basic_or_bearer_and_answers_no_cors():
    h = Harness(admin_token=ADMIN, cors_origins=("*",))
    for path in ("/status", "/status.json"):
        response, body = h.request("GET", path)
        assert response.code == 401
        assert response.headers.getRawHeaders("www-authenticate")[0].startswith("Basic ")
        assert json.loads(body)["error"]["code"] == "ADMIN_TOKEN_REQUIRED"
        wrong = {"Authorization": "Basic " + base64.b64encode(b"x:nope").decode()}
        assert h.request("GET", path, headers=wrong)[0].code == 401
        for auth in ("Basic " + base64.b64encode(f":{ADMIN}".encode()).decode(), f"Bearer {ADMIN}"):
            response, _ = h.request("GET", path, headers={"Authorization": auth,
                                                          "Origin": "https://evil.example"})
            assert response.code == 200
            assert response.headers.getRawHeaders("access-control-allow-origin") is None
            assert "frame-ancestors 'none'" in response.headers.getRawHeaders(
                "content-security-policy")[0]


# --- actions ---

def test_delete_with_the_token_and_confirmed_deletes():
    h = Harness()
    h.store.add("lmarena.ai", "team-a")
    response, body = h.request("POST", "/status/delete", form={
        "csrf": h.csrf(), "domain": "lmarena.ai", "session_name": "team-a", "confirm": "yes"})
    assert response.code == 200 and b"Session deleted" in body
    assert h.store.get("lmarena.ai", "team-a") is None


@pytest.mark.parametrize("csrf, code", [(None, "CSRF_TOKEN_REQUIRED"),
                                        ("1790000000.bad", "CSRF_TOKEN_INVALID")])
def test_an_action_without_a_valid_csrf_token_is_refused_and_changes_nothing(csrf, code):
    h = Harness()
    h.store.add("lmarena.ai", "team-a")
    form = {"domain": "lmarena.ai", "session_name": "team-a", "confirm": "yes"}
    if csrf:
        form["csrf"] = csrf
    for action in ("delete", "revoke", "install-link"):
        response, body = h.request("POST", f"/status/{action}", form=form)
        assert response.code == 403
        assert json.loads(body)["error"]["code"] == code
    assert h.store.get("lmarena.ai", "team-a") is not None
    assert h.tokens.source.generations == {}


@pytest.mark.parametrize("admin_token, code", [(None, "ORIGIN_NOT_ALLOWED"),
                                               (ADMIN, "CSRF_ORIGIN_REFUSED")])
def test_an_action_from_another_origin_is_refused_even_with_the_token(admin_token, code):
    # without a token the admin rule refuses pages; with one, the action's own check does
    h = Harness(admin_token=admin_token)
    h.store.add("lmarena.ai", "team-a")
    auth = {"Authorization": f"Bearer {ADMIN}"} if admin_token else {}
    csrf = re.search(r'name="csrf" value="([^"]+)"', h.page(headers=auth)).group(1)
    form = {"csrf": csrf, "domain": "lmarena.ai", "session_name": "team-a", "confirm": "yes"}
    response, body = h.request("POST", "/status/delete", form=form,
                               headers={**auth, "Origin": "https://evil.example"})
    assert response.code == 403 and json.loads(body)["error"]["code"] == code
    assert h.store.get("lmarena.ai", "team-a") is not None
    # the page's own origin, as a browser sends it with the form
    same = h.request("POST", "/status/delete", form=form,
                     headers={**auth, "Origin": "http://127.0.0.1:8080",
                              "Sec-Fetch-Site": "same-origin"})[0]
    assert same.code == 200 and h.store.get("lmarena.ai", "team-a") is None


def test_an_unconfirmed_action_asks_first_and_changes_nothing():
    h = Harness()
    h.store.add("lmarena.ai", "team-a")
    csrf = h.csrf()
    response, body = h.request("POST", "/status/delete", form={
        "csrf": csrf, "domain": "lmarena.ai", "session_name": "team-a"})
    assert response.code == 200 and b"Are you sure?" in body
    assert b'name="confirm" value="yes"' in body and csrf.encode() in body
    assert h.store.get("lmarena.ai", "team-a") is not None


def test_actions_need_the_admin_check_too():
    h = Harness(admin_token=ADMIN)
    h.store.add("lmarena.ai", "team-a")
    auth = {"Authorization": f"Bearer {ADMIN}"}
    csrf = re.search(r'name="csrf" value="([^"]+)"', h.page(headers=auth)).group(1)
    form = {"csrf": csrf, "domain": "lmarena.ai", "session_name": "team-a", "confirm": "yes"}
    assert h.request("POST", "/status/delete", form=form)[0].code == 401
    assert h.store.get("lmarena.ai", "team-a") is not None
    assert h.request("POST", "/status/delete", form=form, headers=auth)[0].code == 200


def test_revoke_makes_the_names_tokens_invalid_at_once():
    h = Harness()
    h.store.add("lmarena.ai", "team-a")
    before = h.tokens.token_for("team-a")
    other = h.tokens.token_for("team-b")
    response, body = h.request("POST", "/status/revoke", form={
        "csrf": h.csrf(), "session_name": "team-a", "confirm": "yes"})
    assert response.code == 200 and b"generation 1" in body
    assert not h.tokens.is_valid("team-a", before)
    assert h.tokens.is_valid("team-b", other)


def test_the_install_link_is_the_user_js_url_without_a_token():
    h = Harness(public_url="https://gw.example.org")
    h.store.add("lmarena.ai", "team-a")
    response, body = h.request("POST", "/status/install-link", form={
        "csrf": h.csrf(), "session_name": "team-a", "confirm": "yes"})
    assert response.code == 200
    assert b'href="https://gw.example.org/userscript/team-a.user.js"' in body
    assert h.tokens.token_for("team-a").encode() not in body and b"registration_token" not in body


def test_bad_action_input_is_refused_in_the_envelope():
    h = Harness()
    h.store.add("lmarena.ai", "team-a")
    response, body = h.request("POST", "/status/delete", form={
        "csrf": h.csrf(), "domain": "elsewhere.example", "session_name": "x", "confirm": "yes"})
    assert response.code == 400 and json.loads(body)["error"]["code"] == "INVALID_DOMAIN"
    response, body = h.request("POST", "/status/delete", form={
        "csrf": h.csrf(), "domain": "lmarena.ai", "session_name": "gone", "confirm": "yes"})
    assert response.code == 404 and json.loads(body)["error"]["code"] == "SESSION_NOT_FOUND"


# --- CSRF tokens ---

def test_csrf_tokens_last_a_day_and_work_on_instances_sharing_the_secret():
    clock = clock_at()
    tokens = RegistrationTokens(MemorySecrets(), clock)
    tokens._apply(tokens.source.read())
    here, there = CsrfTokens(clock, tokens), CsrfTokens(clock, tokens)
    token = here.issue()
    assert here.valid(token) and there.valid(token)
    assert not CsrfTokens(clock).valid(token)  # no shared secret, a key of its own
    issued, mac = token.split(".")
    assert not here.valid(f"{int(issued) + 1}.{mac}")
    clock.advance(24 * 3600 + 1)
    assert not here.valid(token)


# --- wiring ---

@pytest.mark.parametrize("interval, probing", [(60.0, True), (0.0, False)])
def test_make_service_runs_the_probe_timer_unless_it_is_off(tmp_path, interval, probing):
    from twisted.application.internet import TimerService
    from twisted.internet.task import Clock as _Clock

    from lmarena_gateway.service import make_service

    config = evolve(GatewayConfig(), storage=str(tmp_path / "s.sqlite3"), probe_interval=interval,
                    listen=("tcp:0:interface=127.0.0.1",))
    root = make_service(config, _Clock(), client=ProbeClient(), store=MemoryStore())
    names = [service.name for service in root]
    assert ("bridge-probe" in names) is probing
    if probing:
        timer = root.getServiceNamed("bridge-probe")
        assert isinstance(timer, TimerService) and timer.step == 5.0
        assert timer.call[0].interval == 60.0


def test_the_page_shows_the_tabs_of_the_real_registry_paired_domains_included():
    """RegistryTabs reads tab mode's registry: a session's own tabs, else a paired domain's."""
    from lmarena_gateway.status import RegistryTabs
    from lmarena_gateway.tabs import TabRegistry

    clock = clock_at()
    registry = TabRegistry(clock)
    config = evolve(GatewayConfig(), domains=("lmarena.ai", "arena.ai"))
    source = RegistryTabs(registry, config)
    assert verifyObject(ITabSource, source)
    assert source.tabs_of("arena.ai", "team-t") is None
    registry.connect("arena.ai", "team-t", "tab-a", [])
    clock.advance(5)
    registry.connect("arena.ai", "team-t", "tab-b", [])
    own = source.tabs_of("arena.ai", "team-t")
    assert own is not None and [(t.tab_id, t.connected_since, t.busy) for t in own.tabs] == [
        ("tab-a", T0, False), ("tab-b", T0 + 5, False)]
    assert own.queued == 0
    # lmarena.ai requests are served by arena.ai's tab (the default --tab-pairs)
    paired = source.tabs_of("lmarena.ai", "team-t")
    assert paired is not None and {t.tab_id for t in paired.tabs} == {"tab-a", "tab-b"}
    assert source.tabs_of("lmarena.ai", "someone-else") is None

    h = Harness(tabs=source)
    h.store.add("arena.ai", "team-t")
    (shown,) = h.json()["sessions"]
    assert shown["served_by"] == "tab" and shown["connected"] is True
    assert [t["tab_id"] for t in shown["tabs"]] == ["tab-a", "tab-b"]
    assert "tab-a" in h.page()
