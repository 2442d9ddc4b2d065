"""Hostile bodies at every route: always the envelope, never Twisted's HTML page or a traceback.

The walk reads the routes from the Klein app itself, so a route added later is walked too.
"""

import json
import re

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from lmarena_gateway.gateway import Gateway

from bridges import ErrorBridge
from support.client import SESSION, call

DEEP_ARRAY = b"[" * 1500 + b"]" * 1500  # 3 KiB
DEEP_OBJECT = b'{"a":' * 1500 + b"1" + b"}" * 1500
HOSTILE = {
    "deep array": DEEP_ARRAY,
    "deep object": DEEP_OBJECT,
    "deep inside a valid shape": json.dumps(dict(SESSION, model="m")).encode()[:-1]
    + b', "messages": ' + DEEP_ARRAY + b"}",
    "lone surrogate token": json.dumps(dict(SESSION, registration_token="\ud800")).encode(),
    "lone surrogate model": json.dumps({"model": "\udfff", "messages": [
        {"role": "user", "content": "\ud800"}]}).encode(),
    "huge integer": b'{"model": "m", "messages": [], "n": ' + b"9" * 5000 + b"}",
    "not utf-8": b'{"model": "\xff\xfe"}',
    "nan": b'{"model": NaN, "messages": [Infinity]}',
    "not an object": b'"just a string"',
    # Under the parse pool's threshold, over the bound on values: refused on the reactor.
    "too many values": b"[" + b"0," * 115_000 + b"0]",
    "empty": b"",
}


@pytest.fixture
def tracebacks():
    seen = []

    def observe(event):
        if event.get("log_failure") is not None or event.get("isError"):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def every_route():
    """(method, concrete path) for each route of the app, placeholders filled in."""
    for rule in Gateway.app.url_map.iter_rules():
        path = re.sub(r"<domain_and_name:[^>]+>", "lmarena.ai/team-alpha", rule.rule)
        path = re.sub(r"<[^>]+>", "team-alpha", path)
        for method in sorted((rule.methods or {"GET", "POST"}) - {"HEAD", "OPTIONS"}):
            yield method, path


# Routes whose answer is a page for a browser (the status page and its files): a 200 is
# HTML, CSS or JavaScript there by design; their errors are still the envelope.
PAGES = {("GET", "/status"), ("GET", "/status/page.css"), ("GET", "/status/page.js")}


def assert_envelope(status, headers, body, where, *, page=False):
    content_type = (headers.getRawHeaders("content-type") or [""])[0]
    if page and status == 200:
        return
    assert "html" not in content_type, where
    if status >= 400:
        assert isinstance(body, dict), (where, status, body)
        error = body["error"]
        assert isinstance(error["message"], str) and isinstance(error["code"], str), where


@pytest_twisted.ensureDeferred
async def test_hostile_bodies_at_every_route_get_the_envelope(gateway_factory, tracebacks):
    gw = await gateway_factory()
    await call("POST", gw.url + "/session/register", SESSION)
    routes = list(every_route())
    assert len(routes) >= 10
    for method, path in routes:
        for name, raw in HOSTILE.items():
            where = f"{method} {path} with {name}"
            status, headers, body = await call(method, gw.url + path, raw,
                                               {"X-Session-Name": "team-alpha"})
            assert_envelope(status, headers, body, where, page=(method, path) in PAGES)
            assert status < 500, where
    assert not tracebacks, [e.get("log_format") for e in tracebacks]


@pytest.mark.parametrize("path", ["/session/register", "/v1/chat/completions",
                                  "/v1/images/generations"])
@pytest.mark.parametrize("raw", [DEEP_ARRAY, DEEP_OBJECT], ids=["array", "object"])
@pytest_twisted.ensureDeferred
async def test_deeply_nested_json_is_invalid_json(gateway_factory, tracebacks, path, raw):
    gw = await gateway_factory()
    await call("POST", gw.url + "/session/register", SESSION)
    status, _, body = await call("POST", gw.url + path, raw, {"X-Session-Name": "team-alpha"})
    assert (status, body["error"]["code"]) == (400, "INVALID_JSON")
    assert not tracebacks


@pytest.mark.parametrize("stream", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_deeply_nested_bridge_error_is_a_bad_response(gateway_factory, listen, tracebacks,
                                                              stream):
    bridge = ErrorBridge(500, b'{"error": ' + DEEP_OBJECT + b"}")
    gw = await gateway_factory(bridge_url=await listen(bridge))
    await call("POST", gw.url + "/session/register", SESSION)
    status, _, body = await call("POST", gw.url + "/v1/chat/completions",
                                 {"model": "m", "stream": stream,
                                  "messages": [{"role": "user", "content": "hi"}]},
                                 {"X-Session-Name": "team-alpha"})
    assert (status, body["error"]["code"]) == (502, "BRIDGE_BAD_RESPONSE")
    assert not tracebacks


@pytest_twisted.ensureDeferred
async def test_a_deeply_nested_model_list_is_a_bad_response(gateway_factory, listen, tracebacks):
    bridge = ErrorBridge(200, b'{"data": ' + DEEP_ARRAY + b"}")
    gw = await gateway_factory(bridge_url=await listen(bridge))
    status, _, body = await call("GET", gw.url + "/v1/models")
    assert (status, body["error"]["code"]) == (502, "BRIDGE_BAD_RESPONSE")
    assert not tracebacks
