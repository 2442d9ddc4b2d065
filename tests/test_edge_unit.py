"""The edge layer in memory: FrontDoor and the routes through StubTreq, time on a Clock.

The loopback tests (test_gateway_http, test_security) show these over real sockets;
here each rule is pinned in milliseconds, with no socket and no reactor time.
"""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from lmarena_gateway import __version__
from lmarena_gateway.store import ISessionStore

from support.client import SESSION
from support.memory import MemoryStore
from support.stub import StubGateway

ADMIN = "admin-token-0123456789abcdef"
PAGE = "https://app.example"


def test_the_memory_store_provides_isessionstore():
    assert verifyObject(ISessionStore, MemoryStore())


# --- /health ---


def test_health_has_its_shape_and_the_clock_s_time():
    gw = StubGateway()
    answer = gw.call("GET", "/health")
    assert answer.status == 200
    assert answer.header("content-type") == "application/json"
    assert answer.json() == {"status": "ok", "time": "2023-11-14T22:13:20Z",
                             "version": __version__,
                             "store": {"backend": "memory", "status": "ok", "sessions": 0}}


def test_health_is_degraded_when_the_store_is():
    gw = StubGateway()
    gw.store.status = "degraded"
    answer = gw.call("GET", "/health")
    assert (answer.status, answer.json()["status"]) == (200, "degraded")


def test_a_doubled_or_trailing_slash_is_served_not_redirected():
    gw = StubGateway()
    for path in ("//health", "/health/"):
        assert gw.call("GET", path).status == 200, path


# --- the OpenAI envelope for what no route answers ---


def test_unknown_path_is_404_in_the_envelope():
    answer = StubGateway().call("GET", "/v2/nothing")
    assert answer.status == 404
    assert answer.header("content-type") == "application/json"
    assert set(answer.json()["error"]) == {"message", "type", "code"}
    assert answer.code == "NOT_FOUND" and "/v2/nothing" in answer.json()["error"]["message"]


def test_wrong_method_is_405_naming_the_allowed_ones():
    answer = StubGateway().call("DELETE", "/v1/chat/completions")
    assert (answer.status, answer.code) == (405, "METHOD_NOT_ALLOWED")
    assert {m.strip() for m in answer.header("allow").split(",")} == {"POST", "OPTIONS"}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/session/register"])
def test_bad_json_is_400_invalid_json(path):
    gw = StubGateway()
    gw.register()
    answer = gw.call("POST", path, b'{"model": ', {"X-Session-Name": "team-alpha"})
    assert (answer.status, answer.code) == (400, "INVALID_JSON")
    assert gw.fake.seen == []


# --- X-Request-ID ---


def test_a_sane_request_id_is_kept():
    answer = StubGateway().call("GET", "/health", headers={"X-Request-ID": "mine-1"})
    assert answer.header("x-request-id") == "mine-1"


@pytest.mark.parametrize("given", [None, "has space", "x" * 129, "caf\u00e9"])
def test_a_missing_or_insane_request_id_is_replaced(given):
    headers = {} if given is None else {"X-Request-ID": given.encode("utf-8")}
    rid = StubGateway().call("GET", "/nowhere", headers=headers).header("x-request-id")
    assert rid is not None and rid != given
    assert len(rid) == 32 and int(rid, 16) >= 0


# --- CORS ---


def test_any_origin_gets_a_star_and_no_vary():
    answer = StubGateway().call("GET", "/health", headers={"Origin": PAGE})
    assert answer.header("access-control-allow-origin") == "*"
    assert answer.header("access-control-expose-headers") == "X-Request-ID"
    assert answer.header("vary") is None  # the same answer for every origin


def test_a_listed_origin_is_echoed_and_the_answer_varies_on_origin():
    gw = StubGateway(cors_origins=(PAGE,))
    listed = gw.call("GET", "/nowhere", headers={"Origin": PAGE})
    assert listed.header("access-control-allow-origin") == PAGE
    assert listed.header("vary") == "Origin"
    other = gw.call("GET", "/health", headers={"Origin": "https://evil.example"})
    assert other.header("access-control-allow-origin") is None
    assert other.header("vary") == "Origin"  # a cache must not share it either way


def test_preflight_echoes_the_headers_it_asks_for():
    answer = StubGateway().call("OPTIONS", "/v1/chat/completions", headers={
        "Origin": PAGE, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-stainless-os"})
    assert answer.status == 204 and answer.body == b""
    assert answer.header("access-control-allow-headers") == "content-type, x-stainless-os"
    assert {m.strip() for m in answer.header("access-control-allow-methods").split(",")} == {
        "GET", "POST", "DELETE", "OPTIONS"}
    assert answer.header("access-control-max-age") == "600"
    assert answer.header("vary") == "Access-Control-Request-Headers"


def test_preflight_gives_the_fixed_list_for_what_is_not_a_header_name():
    answer = StubGateway().call("OPTIONS", "/v1/models", headers={
        "Origin": PAGE, "Access-Control-Request-Headers": "x-ok, not a name"})
    allowed = {h.strip().lower() for h in answer.header("access-control-allow-headers").split(",")}
    assert allowed == {"content-type", "authorization", "x-session-name", "x-target-domain",
                       "x-request-id"}


def test_preflight_of_an_unlisted_origin_gets_no_echo():
    answer = StubGateway(cors_origins=(PAGE,)).call("OPTIONS", "/v1/models", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Headers": "x-anything"})
    assert answer.header("access-control-allow-origin") is None
    assert "x-anything" not in answer.header("access-control-allow-headers")
    assert answer.header("vary") == "Origin, Access-Control-Request-Headers"


# --- admin routes ---


def test_admin_answers_carry_no_cors_even_under_a_star():
    gw = StubGateway()
    for method in ("GET", "OPTIONS"):
        answer = gw.call(method, "/session/list")
        assert answer.header("access-control-allow-origin") is None, method
    answer = gw.call("OPTIONS", "/session/list", headers={"Origin": PAGE})
    assert answer.header("access-control-allow-origin") is None
    assert answer.header("vary").startswith("Origin")


def test_without_a_token_admin_routes_answer_this_machine_only():
    gw = StubGateway()
    assert gw.call("GET", "/session/list").status == 200
    for headers, code in (({"X-Forwarded-For": "203.0.113.9"}, "ADMIN_LOCAL_ONLY"),
                          ({"Host": "rebound.example"}, "HOST_NOT_ALLOWED"),
                          ({"Origin": PAGE}, "ORIGIN_NOT_ALLOWED")):
        answer = gw.call("GET", "/session/list", headers=headers)
        assert (answer.status, answer.code) == (403, code), headers


def test_with_a_token_the_token_decides():
    gw = StubGateway(admin_token=ADMIN)
    missing = gw.call("GET", "/session/list")
    assert (missing.status, missing.code) == (401, "ADMIN_TOKEN_REQUIRED")
    assert missing.header("www-authenticate") == 'Bearer realm="lmgateway"'
    wrong = gw.call("GET", "/session/list", headers={"Authorization": "Bearer nope"})
    assert (wrong.status, wrong.code) == (403, "ADMIN_TOKEN_INVALID")
    right = gw.call("GET", "/session/list", headers={"Authorization": f"Bearer {ADMIN}",
                                                     "X-Forwarded-For": "203.0.113.9"})
    assert right.status == 200


def test_a_listed_origin_reads_admin_answers_only_with_a_token():
    headers = {"Origin": PAGE, "Authorization": f"Bearer {ADMIN}"}
    with_token = StubGateway(admin_token=ADMIN, cors_origins=(PAGE,))
    assert with_token.call("GET", "/session/list", headers=headers).header(
        "access-control-allow-origin") == PAGE
    without = StubGateway(cors_origins=(PAGE,))
    assert without.call("GET", "/session/list", headers={"Origin": PAGE}).header(
        "access-control-allow-origin") is None


def test_listing_hides_bridge_keys_and_delete_removes_the_session():
    gw = StubGateway()
    gw.register(bridge_api_key="team-SECRET")
    listing = gw.call("GET", "/session/list?domain=lmarena.ai")
    shown = listing.json()["domains"]["lmarena.ai"]["team-alpha"]
    assert shown["has_bridge_api_key"] is True and b"team-SECRET" not in listing.body
    deleted = gw.call("DELETE", "/session/lmarena.ai/team-alpha")
    assert deleted.json() == {"status": "deleted", "domain": "lmarena.ai", "session_name": "team-alpha"}
    assert gw.store.get("lmarena.ai", "team-alpha") is None
    again = gw.call("DELETE", "/session/lmarena.ai/team-alpha")
    assert (again.status, again.code) == (404, "SESSION_NOT_FOUND")


def test_registration_from_a_foreign_page_changes_nothing():
    gw = StubGateway()
    answer = gw.call("POST", "/session/register", SESSION, {"Origin": "https://evil.example"})
    assert (answer.status, answer.code) == (403, "ORIGIN_NOT_ALLOWED")
    assert answer.header("access-control-allow-origin") is None
    assert gw.store.records() == []
    ok = gw.call("POST", "/session/register", SESSION)
    assert ok.status == 200 and gw.store.get("lmarena.ai", "team-alpha") is not None


def test_registration_without_admin_or_token_is_refused():
    gw = StubGateway()
    answer = gw.call("POST", "/session/register", SESSION, {"X-Forwarded-For": "203.0.113.9"})
    assert (answer.status, answer.code) == (401, "REGISTRATION_TOKEN_REQUIRED")
    assert gw.store.records() == []
