"""The HTTP surface every route shares: health, CORS, 404/405 envelopes, request logs."""

from datetime import datetime, timezone

import pytest_twisted
from twisted.logger import globalLogPublisher

from lmarena_gateway import __version__

from support.client import call


@pytest_twisted.ensureDeferred
async def test_health(gateway_factory):
    gw = await gateway_factory()
    status, headers, body = await call("GET", gw.url + "/health")
    assert status == 200
    assert headers.getRawHeaders("content-type") == ["application/json"]
    assert body["status"] == "ok" and body["version"] == __version__
    when = datetime.strptime(body["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - when).total_seconds()) < 5
    assert body["store"]["backend"] == "sqlite-dbm"


@pytest_twisted.ensureDeferred
async def test_unknown_path_is_404_in_the_envelope(gateway_factory):
    gw = await gateway_factory()
    status, _, body = await call("GET", gw.url + "/v2/nothing")
    assert status == 404
    assert body["error"]["code"] == "NOT_FOUND"
    assert "/v2/nothing" in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "code"}


@pytest_twisted.ensureDeferred
async def test_wrong_method_is_405_with_allow(gateway_factory):
    gw = await gateway_factory()
    status, headers, body = await call("DELETE", gw.url + "/v1/chat/completions")
    assert status == 405
    assert body["error"]["code"] == "METHOD_NOT_ALLOWED"
    allowed = headers.getRawHeaders("allow")[0]
    assert "POST" in allowed and "DELETE" not in allowed


@pytest_twisted.ensureDeferred
async def test_preflight(gateway_factory):
    gw = await gateway_factory()
    status, headers, body = await call("OPTIONS", gw.url + "/v1/chat/completions", headers={
        "Origin": "https://lmarena.ai", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-session-name"})
    assert status == 204
    assert headers.getRawHeaders("access-control-allow-origin") == ["*"]
    methods = headers.getRawHeaders("access-control-allow-methods")[0]
    assert {m.strip() for m in methods.split(",")} >= {"GET", "POST", "DELETE", "OPTIONS"}
    allowed = {h.strip().lower() for h in headers.getRawHeaders("access-control-allow-headers")[0].split(",")}
    assert allowed == {"content-type", "x-session-name"}  # what it asked for
    status, headers, body = await call("OPTIONS", gw.url + "/v1/chat/completions", headers={
        "Origin": "https://lmarena.ai", "Access-Control-Request-Method": "POST"})
    allowed = {h.strip().lower() for h in headers.getRawHeaders("access-control-allow-headers")[0].split(",")}
    assert allowed >= {"content-type", "authorization", "x-session-name", "x-target-domain", "x-request-id"}


@pytest_twisted.ensureDeferred
async def test_cors_headers_on_normal_errors_and_streams(gateway_factory, reactor):
    from support.client import SESSION

    gw = await gateway_factory(cors_origins=("https://app.example",))
    origin = {"Origin": "https://app.example"}
    for method, path, body in [("GET", "/health", None), ("GET", "/nowhere", None)]:
        _, headers, _ = await call(method, gw.url + path, body, origin)
        assert headers.getRawHeaders("access-control-allow-origin") == ["https://app.example"]
    await call("POST", gw.url + "/session/register", SESSION)
    _, headers, body = await call("POST", gw.url + "/v1/chat/completions", {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        {**origin, "X-Session-Name": "team-alpha"})
    assert headers.getRawHeaders("content-type") == ["text/event-stream"]
    assert headers.getRawHeaders("access-control-allow-origin") == ["https://app.example"]
    _, headers, _ = await call("GET", gw.url + "/health", None, {"Origin": "https://evil.example"})
    assert headers.getRawHeaders("access-control-allow-origin") is None


@pytest_twisted.ensureDeferred
async def test_request_log_line(gateway_factory):
    from support.client import SESSION

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        gw = await gateway_factory(log_requests=True)
        await call("POST", gw.url + "/session/register", dict(SESSION, bridge_api_key="k-SECRET-1"))
        await call("POST", gw.url + "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "the-secret-prompt"}]},
            {"X-Session-Name": "team-alpha", "X-Target-Domain": "lmarena.ai",
             "Authorization": "Bearer client-SECRET-2"})
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if e.get("log_format", "").startswith("{method} {path}")]
    chat = [e for e in lines if e["path"] == "/v1/chat/completions"]
    assert len(chat) == 1
    assert chat[0]["status"] == 200 and chat[0]["method"] == "POST"
    assert chat[0]["bytes"] > 0 and chat[0]["ms"] >= 0
    assert chat[0]["session"] == "team-alpha" and chat[0]["domain"] == "lmarena.ai"
    from twisted.logger import formatEvent

    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    for secret in ("k-SECRET-1", "client-SECRET-2", "the-secret-prompt"):
        assert secret not in text


@pytest_twisted.ensureDeferred
async def test_no_request_log_by_default(gateway_factory):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        gw = await gateway_factory()
        await call("GET", gw.url + "/health")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not [e for e in events if e.get("log_format", "").startswith("{method} {path}")]


@pytest_twisted.ensureDeferred
async def test_allow_names_only_the_methods_of_that_path(gateway_factory):
    gw = await gateway_factory()
    for path, allowed in (("/session/register", {"POST", "OPTIONS"}),
                          ("/session/list", {"GET", "HEAD", "OPTIONS"}),
                          ("/session/lmarena.ai/x", {"DELETE", "OPTIONS"})):
        status, headers, _ = await call("PUT", gw.url + path)
        assert status == 405
        assert {m.strip() for m in headers.getRawHeaders("allow")[0].split(",")} == allowed, path
