"""What real clients and PHP-gateway clients send: forgiving paths, the PHP codes, CORS
for browser SDKs, retry hints, and errors that name the session instead of a URL."""

import json

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher

from bridges import ErrorBridge
from support.client import SESSION, call
from support.processes import free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
HEADERS = {"X-Session-Name": "team-alpha", "X-Target-Domain": "lmarena.ai"}


async def registered(gateway_factory, session=None, **config):
    gw = await gateway_factory(**config)
    status, _, _ = await call("POST", gw.url + "/session/register", session or SESSION)
    assert status == 200
    return gw


def header(headers, name):
    values = headers.getRawHeaders(name)
    return values[0] if values else None


# --- forgiving paths ---


@pytest.mark.parametrize("path", ["/v1//chat/completions", "//v1/chat/completions",
                                  "/v1/chat//completions", "/v1/chat/completions/"])
@pytest_twisted.ensureDeferred
async def test_repeated_and_trailing_slashes_are_served_never_redirected(gateway_factory, path):
    gw = await registered(gateway_factory)
    status, headers, answer = await call("POST", gw.url + path, CHAT, HEADERS)
    assert status == 200, answer
    assert header(headers, "location") is None
    assert answer["object"] == "chat.completion"
    assert gw.bridge.seen[-1]["path"] == "/v1/chat/completions"


@pytest_twisted.ensureDeferred
async def test_models_with_a_base_url_ending_in_a_slash(gateway_factory):
    gw = await gateway_factory()
    status, _, answer = await call("GET", gw.url + "/v1//models")
    assert status == 200 and answer["object"] == "list"


@pytest.mark.parametrize("path, instead", [("/v1/completions", "/v1/chat/completions"),
                                           ("/v1/embeddings", "embeddings provider")])
@pytest.mark.parametrize("method", ["POST", "GET"])
@pytest_twisted.ensureDeferred
async def test_unsupported_endpoints_say_what_to_use(gateway_factory, path, instead, method):
    gw = await gateway_factory()
    body = {"model": "m", "prompt": "x", "input": "x"} if method == "POST" else None
    status, _, answer = await call(method, gw.url + path, body, HEADERS)
    assert status == 404
    assert answer["error"]["code"] == "UNSUPPORTED_ENDPOINT"
    assert instead in answer["error"]["message"]
    assert gw.bridge.seen == []


# --- GET /v1/models/{id} ---


@pytest_twisted.ensureDeferred
async def test_one_model_from_the_same_list_aliases_included(gateway_factory):
    gw = await registered(gateway_factory, dict(SESSION, models={"gpt-4": "fake-model"}))
    status, _, model = await call("GET", gw.url + "/v1/models/fake-model", None, HEADERS)
    assert status == 200
    assert model["id"] == "fake-model" and model["object"] == "model"
    status, _, alias = await call("GET", gw.url + "/v1/models/gpt-4", None, HEADERS)
    assert status == 200 and "alias of fake-model" in alias["owned_by"]
    # another session does not have the alias
    status, _, answer = await call("GET", gw.url + "/v1/models/gpt-4")
    assert status == 404 and answer["error"]["code"] == "MODEL_NOT_FOUND"
    assert "gpt-4" in answer["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_a_model_id_with_a_slash(gateway_factory):
    gw = await registered(gateway_factory, dict(SESSION, models={"meta/llama": "fake-model"}))
    status, _, model = await call("GET", gw.url + "/v1/models/meta/llama", None, HEADERS)
    assert status == 200 and model["id"] == "meta/llama"


# --- the PHP gateway's codes ---


@pytest_twisted.ensureDeferred
async def test_registration_fields_with_surrounding_blanks_are_trimmed(gateway_factory):
    gw = await gateway_factory()
    padded = {key: f"  {value}\t" for key, value in SESSION.items()}
    status, _, answer = await call("POST", gw.url + "/session/register", padded)
    assert status == 200, answer
    assert answer["session_name"] == "team-alpha"
    record = gw.store.get("lmarena.ai", "team-alpha")
    assert record.session_id == SESSION["session_id"]


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", b"{not json"),
    ("/v1/images/generations", b"{not json"),
])
@pytest_twisted.ensureDeferred
async def test_malformed_json_is_invalid_json(gateway_factory, path, body):
    gw = await registered(gateway_factory)
    status, _, answer = await call("POST", gw.url + path, body, HEADERS)
    assert status == 400 and answer["error"]["code"] == "INVALID_JSON"
    assert gw.bridge.seen == []


@pytest_twisted.ensureDeferred
async def test_x_session_id_names_the_session_when_x_session_name_is_absent(gateway_factory):
    gw = await registered(gateway_factory)
    status, _, _ = await call("POST", gw.url + "/v1/chat/completions", CHAT,
                              {"X-Session-ID": "team-alpha"})
    assert status == 200
    assert gw.bridge.seen[-1]["headers"]["x-lmarena-session-id"] == SESSION["session_id"]
    # X-Session-Name wins when both are sent
    status, _, answer = await call("POST", gw.url + "/v1/chat/completions", CHAT,
                                   {"X-Session-ID": "team-alpha", "X-Session-Name": "other"})
    assert status == 404 and "'other'" in answer["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_userscript_without_a_name_is_the_default_script(gateway_factory):
    gw = await gateway_factory()
    status, headers, body = await call("GET", gw.url + "/userscript/generate")
    assert status == 200
    assert b'var SESSION_NAME = "default";' in body
    assert header(headers, "content-type").startswith("text/javascript")


# --- errors that clients show their users ---


@pytest_twisted.ensureDeferred
async def test_bridge_errors_name_the_session_and_the_log_has_the_url(gateway_factory):
    dead = f"http://127.0.0.1:{free_port()}"
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        gw = await registered(gateway_factory, dict(SESSION, bridge_base_url=dead))
        status, headers, answer = await call("POST", gw.url + "/v1/chat/completions", CHAT,
                                             dict(HEADERS, **{"X-Request-ID": "rid-42"}))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert status == 502
    assert answer["error"]["message"] == "the bridge of session 'team-alpha' is unreachable"
    lines = [e for e in events if e.get("request_id") == "rid-42" and e.get("url")]
    assert lines and dead in lines[0]["url"]


class _PlainAnswer(Protocol):
    """A plain-http server that answers a TLS ClientHello at once, as uvicorn does."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        self.transport.loseConnection()


@pytest.mark.parametrize("server", ["twisted.web", "answers-at-once"])
@pytest_twisted.ensureDeferred
async def test_https_bridge_url_in_front_of_plain_http_is_a_tls_error(gateway_factory, listen,
                                                                      reactor, server):
    """twisted.web (the fake bridge) waits for a request line: the handshake deadline
    (--connect-timeout) ends the wait; a server that answers fails the handshake at once."""
    from twisted.internet.endpoints import TCP4ServerEndpoint

    if server == "twisted.web":
        plain = await listen(ErrorBridge(200, {}))
    else:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(_PlainAnswer))
        plain = f"http://127.0.0.1:{port.getHost().port}"
    tls = plain.replace("http://", "https://")
    gw = await registered(gateway_factory, dict(SESSION, bridge_base_url=tls),
                          connect_timeout=0.5, stream_idle_timeout=60.0)
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/models", None)):
        method = "POST" if body else "GET"
        status, headers, answer = await call(method, gw.url + path, body, HEADERS)
        assert status == 502, answer
        assert header(headers, "content-type") == "application/json"
        assert answer["error"]["code"] == "BRIDGE_TLS_ERROR"
        assert "plain-http" in answer["error"]["message"]
    if server != "twisted.web":
        await port.stopListening()


class _Misbehaving(Protocol):
    """A bridge socket that answers the way no HTTP server should."""

    def __init__(self, how: str) -> None:
        self.how = how

    def dataReceived(self, data: bytes) -> None:
        if self.how == "close":
            self.transport.loseConnection()
        elif self.how == "garbage":
            self.transport.write(b"\x00\x01 this is not HTTP\r\n\r\n")
            self.transport.loseConnection()
        elif self.how == "half-headers":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: applic")
            self.transport.loseConnection()
        elif self.how == "short-body":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"a\"")
            self.transport.loseConnection()
        elif self.how == "reset":
            self.transport.abortConnection()


@pytest.mark.parametrize("how, status", [
    ("close", 502), ("garbage", 502), ("half-headers", 502), ("reset", 502)])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/images/generations",
                                  "/v1/models"])
@pytest_twisted.ensureDeferred
async def test_every_client_side_failure_is_an_envelope(gateway_factory, reactor, how, status,
                                                       path):
    from twisted.internet.endpoints import TCP4ServerEndpoint

    factory = Factory.forProtocol(lambda: _Misbehaving(how))
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        url = f"http://127.0.0.1:{port.getHost().port}"
        gw = await registered(gateway_factory, dict(SESSION, bridge_base_url=url))
        body = None if path == "/v1/models" else dict(CHAT, prompt="p")
        got, headers, answer = await call("POST" if body else "GET", gw.url + path, body,
                                          HEADERS)
    finally:
        await port.stopListening()
    assert got == status, answer
    assert header(headers, "content-type") == "application/json"
    assert answer["error"]["code"] == "BRIDGE_ERROR"
    assert answer["error"]["message"].startswith("the bridge of session 'team-alpha'")


# --- retry hints ---


@pytest_twisted.ensureDeferred
async def test_bridge_not_ready_tells_clients_not_to_retry(gateway_factory):
    gw = await registered(gateway_factory)
    status, headers, answer = await call("POST", gw.url + "/v1/chat/completions",
                                         dict(CHAT, model="fake-error-503"), HEADERS)
    assert status == 503 and answer["error"]["code"] == "BRIDGE_NOT_READY"
    assert header(headers, "x-should-retry") == "false"
    # other errors leave the choice to the client
    status, headers, _ = await call("POST", gw.url + "/v1/chat/completions",
                                    dict(CHAT, model="fake-error-500"), HEADERS)
    assert status == 500 and header(headers, "x-should-retry") is None


@pytest_twisted.ensureDeferred
async def test_the_bridges_retry_after_is_passed_on(gateway_factory, listen):
    from twisted.web.resource import Resource

    class Limited(Resource):
        isLeaf = True

        def render(self, request):
            request.setResponseCode(429)
            request.setHeader(b"Retry-After", b"17")
            return json.dumps({"detail": "slow down"}).encode()

    gw = await registered(gateway_factory, bridge_url=await listen(Limited()))
    status, headers, answer = await call("POST", gw.url + "/v1/chat/completions", CHAT, HEADERS)
    assert status == 429 and answer["error"]["code"] == "BRIDGE_RATE_LIMITED"
    assert header(headers, "retry-after") == "17"


def test_tab_not_connected_policy_is_declared_once():
    from lmarena_gateway.errors import ApiError

    error = ApiError(503, "TAB_NOT_CONNECTED", "no tab", headers={"Retry-After": "5"})
    assert dict(error.response_headers()) == {"Retry-After": "5", "x-should-retry": "false"}
    assert ApiError(400, "INVALID_JSON", "x").response_headers() == ()


# --- CORS for browser apps ---


STAINLESS = ("content-type,authorization,x-stainless-os,x-stainless-lang,"
             "x-stainless-package-version,x-stainless-retry-count,x-session-name")


@pytest.mark.parametrize("origins", [("*",), ("https://app.example",)])
@pytest_twisted.ensureDeferred
async def test_preflight_allows_the_headers_it_asks_for(gateway_factory, origins):
    gw = await gateway_factory(cors_origins=origins)
    status, headers, _ = await call("OPTIONS", gw.url + "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": STAINLESS})
    assert status == 204
    allowed = {h.strip() for h in header(headers, "access-control-allow-headers").split(",")}
    assert allowed == set(STAINLESS.split(","))
    assert "Access-Control-Request-Headers" in header(headers, "vary")


@pytest_twisted.ensureDeferred
async def test_preflight_does_not_echo_what_is_not_a_header_name(gateway_factory):
    gw = await gateway_factory()
    status, headers, _ = await call("OPTIONS", gw.url + "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-ok, bad header, x-y"})
    allowed = header(headers, "access-control-allow-headers")
    assert "bad header" not in allowed and "x-ok" not in allowed
    assert "Authorization" in allowed


@pytest_twisted.ensureDeferred
async def test_preflight_from_another_origin_gets_no_echo(gateway_factory):
    gw = await gateway_factory(cors_origins=("https://app.example",))
    _, headers, _ = await call("OPTIONS", gw.url + "/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-stainless-os"})
    assert header(headers, "access-control-allow-origin") is None
    assert "x-stainless-os" not in header(headers, "access-control-allow-headers")


@pytest_twisted.ensureDeferred
async def test_vary_origin_on_every_response_when_origins_are_listed(gateway_factory):
    gw = await gateway_factory(cors_origins=("https://app.example",))
    for origin in ({"Origin": "https://app.example"}, {"Origin": "https://evil.example"}, {}):
        _, headers, _ = await call("GET", gw.url + "/health", None, origin)
        assert "Origin" in header(headers, "vary"), origin
    star = await gateway_factory(cors_origins=("*",))
    _, headers, _ = await call("GET", star.url + "/health", None, {"Origin": "https://a.example"})
    assert header(headers, "vary") is None  # "*" does not vary


# --- what the README and docs say is true ---


def _doc_texts():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    return {path.name: path.read_text() for path in [root / "README.rst",
                                                     *sorted((root / "docs").glob("*.rst"))]}


def test_docs_name_no_machine_specific_paths():
    import re

    for name, text in _doc_texts().items():
        assert not re.search(r"/(tmp|work|home|root|Users)/\w", text), name


def test_readme_sample_output_is_what_the_fake_bridge_sends():
    from lmarena_gateway.fakebridge import TEXT, split_text

    readme = _doc_texts()["README.rst"]
    first = split_text(TEXT, 8)[0]  # the CLI's default --chunks
    assert f'"content": "{first}"' in readme
    assert "fake bridge listening on http://127.0.0.1:5102" in readme


def test_the_error_table_gives_the_status_a_wrong_admin_token_gets():
    from twisted.web.test.requesthelper import DummyRequest

    from lmarena_gateway.errors import ApiError
    from lmarena_gateway.security import AdminAuth

    api = _doc_texts()["api.rst"]
    row = api[api.index("``ADMIN_TOKEN_INVALID``"):][:200]
    statuses = set()
    for allow_basic in (False, True):
        request = DummyRequest([b"session", b"list"])
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer wrong-token-0123456"])
        with pytest.raises(ApiError) as refused:
            AdminAuth("right-token-0123456789ab").require(request, allow_basic=allow_basic)
        assert refused.value.code == "ADMIN_TOKEN_INVALID"
        statuses.add(str(refused.value.status))
    assert "/".join(sorted(statuses, reverse=True)) in row  # "403/401"
