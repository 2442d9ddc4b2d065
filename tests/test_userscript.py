"""The generated userscript: its metadata, what it embeds, and what no input can inject."""

from __future__ import annotations

import json
import re
import socket

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.threads import deferToThread

from lmarena_gateway.config import GatewayConfig
from lmarena_gateway.errors import ApiError
from lmarena_gateway.userscript import gateway_url_for, js_literal, render_script

from support.client import call

DOMAINS = ("lmarena.ai", "canary.lmarena.ai")
HOSTILE = 'x"</script><script>alert(1)</script>\u2028\u2029\n// @require https://evil/'


def render(**overrides) -> str:
    values = {"session_name": "team-alpha", "gateway_url": "http://gw.example:8080",
              "domains": DOMAINS, **overrides}
    return render_script(**values)


def metadata(text: str) -> list[tuple[str, str]]:
    """The metadata block as (key, value) pairs, checking its frame on the way."""
    lines = text.split("\n")
    assert lines[0] == "// ==UserScript=="
    end = lines.index("// ==/UserScript==")
    pairs = []
    for line in lines[1:end]:
        match = re.fullmatch(r"// (@[\w:-]+)(?:\s+(.*))?", line)
        assert match, f"not a metadata line: {line!r}"
        pairs.append((match.group(1), match.group(2) or ""))
    return pairs


def setting(text: str, name: str):
    """The value of one ``var NAME = <JSON>;`` line, parsed as JSON."""
    match = re.search(rf"^  var {name} = (.*);$", text, re.M)
    assert match, f"no {name} in the script"
    return json.loads(match.group(1))


def version(text: str) -> str:
    return dict(metadata(text))["@version"]


# --- the text ---


def test_metadata_lines():
    meta = metadata(render())
    keys = [k for k, _ in meta]
    values = dict(meta)
    assert values["@name"] == "LMArena registrar: team-alpha"
    assert values["@namespace"] == "lmarena-gateway"
    assert re.fullmatch(r"\d+\.\d+", values["@version"])
    # every configured domain and its subdomains (tab mode runs wherever the tab is)
    assert [v for k, v in meta if k == "@match"] == [
        "https://lmarena.ai/*", "https://*.lmarena.ai/*",
        "https://canary.lmarena.ai/*", "https://*.canary.lmarena.ai/*"]
    assert values["@run-at"] == "document-start"
    assert ("@grant", "GM_xmlhttpRequest") in meta
    assert [v for k, v in meta if k == "@connect"] == ["gw.example"]
    update = "http://gw.example:8080/userscript/team-alpha.user.js"
    assert values["@updateURL"] == update and values["@downloadURL"] == update
    repeated = {k for k in keys if keys.count(k) > 1}
    assert repeated <= {"@match", "@grant"}


def test_settings_are_json_literals():
    text = render()
    assert setting(text, "SESSION_NAME") == "team-alpha"
    assert setting(text, "GATEWAY_URL") == "http://gw.example:8080"
    assert setting(text, "DOMAINS") == list(DOMAINS)
    assert setting(text, "REGISTRATION_TOKEN") is None


def test_registration_token_is_embedded_and_posted_only_when_given():
    assert setting(render(registration_token="s3cret"), "REGISTRATION_TOKEN") == "s3cret"
    # the code adds the field only for a non-null token, under exactly this name
    assert 'if (REGISTRATION_TOKEN !== null) { body.registration_token = REGISTRATION_TOKEN; }' \
        in render()


def test_the_update_url_carries_the_token_percent_encoded():
    values = dict(metadata(render(registration_token="a b/+=&\n@x")))
    expected = ("http://gw.example:8080/userscript/team-alpha.user.js"
                "?registration_token=a%20b%2F%2B%3D%26%0A%40x")
    assert values["@updateURL"] == expected and values["@downloadURL"] == expected


def test_hostile_token_cannot_leave_its_string():
    text = render(registration_token=HOSTILE)
    assert setting(text, "REGISTRATION_TOKEN") == HOSTILE
    line = next(ln for ln in text.split("\n") if "REGISTRATION_TOKEN =" in ln)
    for bad in ("<", ">", "\u2028", "\u2029"):
        assert bad not in line
    assert "</script" not in text.lower()
    assert [k for k, _ in metadata(text)] == [k for k, _ in metadata(render())]


def test_js_literal_escapes_html_and_line_separators():
    assert js_literal("</script>&\u2028\u2029é") == \
        '"\\u003c/script\\u003e\\u0026\\u2028\\u2029\\u00e9"'
    assert js_literal(None) == "null"
    assert json.loads(js_literal(["a<b", "c"])) == ["a<b", "c"]


def test_trailing_slash_of_the_gateway_url_is_dropped():
    text = render(gateway_url="https://gw.example/prefix/")
    assert setting(text, "GATEWAY_URL") == "https://gw.example/prefix"
    assert dict(metadata(text))["@updateURL"] == \
        "https://gw.example/prefix/userscript/team-alpha.user.js"


@pytest.mark.parametrize("url", [
    "http://gw.example\n// @require https://evil/",
    "http://gw.example/\u2028",
    'http://gw.example/"x',
    "http://gw.example/a b",
    "http://gw.example/<script>",
    "http://gw.example/?q=1",
    "http://gw.example/#f",
    "http://user@gw.example/",
    "javascript:alert(1)",
    "ftp://gw.example/",
    "http://gw.example:99999",
    "http://gw.example:0",
])
def test_a_gateway_url_that_could_break_out_is_refused(url):
    with pytest.raises(ValueError):
        render(gateway_url=url)


@pytest.mark.parametrize("domain", [
    "evil.example\n// @require https://evil/", "a b", "*.lmarena.ai", "lmarena.ai/x", 'a"b', ""])
def test_a_domain_that_could_break_out_is_refused(domain):
    with pytest.raises(ValueError):
        render(domains=("lmarena.ai", domain))


@pytest.mark.parametrize("name", ["", "a b", "a\n// @grant none", "x" * 65, "</script>"])
def test_a_bad_session_name_is_refused(name):
    with pytest.raises(ValueError):
        render(session_name=name)


def test_same_inputs_same_text_and_version():
    assert render() == render()
    assert render(registration_token="t") == render(registration_token="t")


@pytest.mark.parametrize("change", [
    {"session_name": "team-beta"},
    {"gateway_url": "http://gw.example:8081"},
    {"gateway_url": "https://gw.example:8080"},
    {"domains": ("lmarena.ai",)},
    {"domains": ("canary.lmarena.ai", "lmarena.ai")},
    {"registration_token": "t"},
])
def test_any_change_changes_the_version(change):
    assert version(render(**change)) != version(render())


def test_version_follows_the_text_exactly():
    variants = [render(**c) for c in ({}, {"session_name": "b"}, {"registration_token": "x"},
                                      {"registration_token": "y"}, {"domains": ("arena.ai",)})]
    variants += [render()]  # a repeat
    by_version = {}
    for text in variants:
        body = re.sub(r"(?m)^// @version .*$", "", text)
        by_version.setdefault(version(text), set()).add(body)
    assert all(len(bodies) == 1 for bodies in by_version.values())
    assert len(by_version) == 5


# --- the gateway URL ---


class FakeRequest:
    """What gateway_url_for reads from a twisted.web request, with raw header values."""

    def __init__(self, headers=None, secure=False, address=None) -> None:
        self.headers = {k.lower().encode(): v.encode("utf-8") for k, v in (headers or {}).items()}
        self.secure = secure
        self.address = address or IPv4Address("TCP", "127.0.0.1", 8080)

    def getHeader(self, name: bytes):
        return self.headers.get(name.lower())

    def isSecure(self) -> bool:
        return self.secure

    def getHost(self):
        return self.address


TRUSTING = GatewayConfig(trust_proxy_headers=True)


def test_url_from_the_host_header():
    assert gateway_url_for(FakeRequest({"Host": "GW.Example:8080"}), GatewayConfig()) == \
        "http://gw.example:8080"
    assert gateway_url_for(FakeRequest({"Host": "gw.example"}, secure=True), GatewayConfig()) == \
        "https://gw.example"
    assert gateway_url_for(FakeRequest({"Host": "[::1]:9"}), GatewayConfig()) == "http://[::1]:9"


def test_url_from_the_address_when_there_is_no_host_header():
    assert gateway_url_for(FakeRequest(), GatewayConfig()) == "http://127.0.0.1:8080"
    six = FakeRequest(address=IPv6Address("TCP", "::1", 8443), secure=True)
    assert gateway_url_for(six, GatewayConfig()) == "https://[::1]:8443"


def test_public_url_wins_over_every_header():
    config = GatewayConfig(public_url="https://gw.example/lm", trust_proxy_headers=True)
    request = FakeRequest({"Host": "other:1", "X-Forwarded-Host": "proxy.example",
                           "X-Forwarded-Proto": "http"})
    assert gateway_url_for(request, config) == "https://gw.example/lm"


def test_a_public_url_that_could_break_out_is_a_server_error():
    # the option parser lets a newline through urlsplit; the generator must not
    config = GatewayConfig(public_url="http://gw.example\n// @require https://evil/")
    with pytest.raises(ApiError) as caught:
        gateway_url_for(FakeRequest({"Host": "gw.example"}), config)
    assert (caught.value.status, caught.value.code) == (500, "INVALID_PUBLIC_URL")


@pytest.mark.parametrize("host", [
    "gw.example\n// @require https://evil/", "gw.example\r", 'gw"example', "gw example",
    "gw.example/path", "gw.example</script>", "gw.example:99999", "gw.example:0",
    "user@gw.example", "gw.example:80:80", "", "[::1", "gw..example", "gw.example\u2028"])
def test_a_hostile_host_header_is_400_invalid_host(host):
    with pytest.raises(ApiError) as caught:
        gateway_url_for(FakeRequest({"Host": host}), GatewayConfig())
    assert (caught.value.status, caught.value.code) == (400, "INVALID_HOST")


def test_forwarded_headers_are_ignored_unless_trusted():
    request = FakeRequest({"Host": "gw.example", "X-Forwarded-Host": "evil\n// @x",
                           "X-Forwarded-Proto": "javascript"})
    assert gateway_url_for(request, GatewayConfig()) == "http://gw.example"


def test_forwarded_headers_are_honoured_when_trusted():
    request = FakeRequest({"Host": "127.0.0.1:8080", "X-Forwarded-Host": "GW.example, inner",
                           "X-Forwarded-Proto": "HTTPS, http"})
    assert gateway_url_for(request, TRUSTING) == "https://gw.example"
    only_proto = FakeRequest({"Host": "gw.example", "X-Forwarded-Proto": "https"})
    assert gateway_url_for(only_proto, TRUSTING) == "https://gw.example"


@pytest.mark.parametrize("headers, code", [
    ({"X-Forwarded-Host": "evil\n// @require https://evil/"}, "INVALID_HOST"),
    ({"X-Forwarded-Host": 'evil"</script>'}, "INVALID_HOST"),
    ({"X-Forwarded-Proto": "javascript"}, "INVALID_FORWARDED_PROTO"),
])
def test_hostile_forwarded_headers_are_400_when_trusted(headers, code):
    with pytest.raises(ApiError) as caught:
        gateway_url_for(FakeRequest({"Host": "gw.example", **headers}), TRUSTING)
    assert (caught.value.status, caught.value.code) == (400, code)


# --- the route, over a real socket ---


HOST_TEST_TOKEN = "host-test-admin-token-0123"


def raw_get(port: int, target: str, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    """A GET with exactly these header bytes (treq would fix up a bad Host).

    HTTP/1.0 so the body is not chunked and ends when the connection does.
    """
    lines = [f"GET {target} HTTP/1.0", *(f"{k}: {v}" for k, v in headers), "Connection: close"]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def port_of(gw) -> int:
    return int(gw.url.rsplit(":", 1)[1])


@pytest_twisted.ensureDeferred
async def test_route_serves_a_download_for_the_request_host(gateway_factory):
    gw = await gateway_factory()
    status, headers, body = await call("GET", gw.url + "/userscript/generate?session_name=team-alpha")
    assert status == 200
    assert headers.getRawHeaders("content-type") == ["text/javascript; charset=utf-8"]
    assert headers.getRawHeaders("content-disposition") == [
        'attachment; filename="lmarena-registrar-team-alpha.user.js"']
    text = body.decode("utf-8")
    assert setting(text, "GATEWAY_URL") == gw.url
    assert setting(text, "DOMAINS") == list(gw.config.domains)
    # whatever token the gateway hands this name, the rest is exactly the rendered script
    assert text == render_script(session_name="team-alpha", gateway_url=gw.url,
                                 domains=gw.config.domains,
                                 registration_token=setting(text, "REGISTRATION_TOKEN"))


@pytest_twisted.ensureDeferred
async def test_the_update_url_fetches_the_same_script_without_the_admin_token(gateway_factory):
    gw = await gateway_factory(admin_token="admin-" + "x" * 20)
    target = "/userscript/generate?session_name=team-alpha"
    status, _, body = await call("GET", gw.url + target)
    assert status in (401, 403)  # the admin route, asked without a token
    status, _, body = await call("GET", gw.url + target,
                                 headers={"Authorization": "Bearer admin-" + "x" * 20})
    assert status == 200
    text = body.decode()
    update = dict(metadata(text))["@updateURL"]
    assert "registration_token=" in update
    status, _, again = await call("GET", update)
    assert status == 200 and again.decode() == text


@pytest_twisted.ensureDeferred
async def test_route_uses_the_public_url(gateway_factory):
    gw = await gateway_factory(public_url="https://gw.example/lm")
    status, _, body = await call("GET", gw.url + "/userscript/generate?session_name=a_b-1")
    assert status == 200
    text = body.decode()
    assert setting(text, "GATEWAY_URL") == "https://gw.example/lm"
    assert ("@connect", "gw.example") in metadata(text)


@pytest.mark.parametrize("query", [
    "?session_name=a%20b", "?session_name=a%2Fb",
    "?session_name=%3C%2Fscript%3E", "?session_name=" + "x" * 65])
@pytest_twisted.ensureDeferred
async def test_route_refuses_a_bad_session_name(gateway_factory, query):
    gw = await gateway_factory()
    status, headers, body = await call("GET", gw.url + "/userscript/generate" + query)
    assert status == 400
    assert body["error"]["code"] == "INVALID_SESSION_NAME"
    assert headers.getRawHeaders("content-type") == ["application/json"]


@pytest.mark.parametrize("host", ['gw"example', "gw.example</script>", "gw example:1",
                                  "gw.example/x", "gw.example:123456"])
@pytest_twisted.ensureDeferred
async def test_route_refuses_a_hostile_host_header(gateway_factory, host):
    # With a token the Host may name the gateway however DNS does (without one, only
    # loopback names are served at all); the script still never carries a hostile one.
    gw = await gateway_factory(admin_token=HOST_TEST_TOKEN)
    status, body = await deferToThread(
        raw_get, port_of(gw), "/userscript/generate?session_name=team-alpha",
        [("Host", host), ("Authorization", f"Bearer {HOST_TEST_TOKEN}")])
    assert status == 400
    assert json.loads(body)["error"]["code"] == "INVALID_HOST"


@pytest_twisted.ensureDeferred
async def test_route_ignores_forwarded_headers_without_trust(gateway_factory):
    gw = await gateway_factory(admin_token=HOST_TEST_TOKEN)
    status, body = await deferToThread(
        raw_get, port_of(gw), "/userscript/generate?session_name=team-alpha",
        [("Host", "gw.example:8080"), ("Authorization", f"Bearer {HOST_TEST_TOKEN}"),
         ("X-Forwarded-Host", 'evil.example"</script>'),
         ("X-Forwarded-Proto", "https")])
    assert status == 200
    text = body.decode()
    assert setting(text, "GATEWAY_URL") == "http://gw.example:8080"
    assert "evil" not in text


@pytest_twisted.ensureDeferred
async def test_route_honours_forwarded_headers_with_trust(gateway_factory):
    gw = await gateway_factory(trust_proxy_headers=True)
    target = "/userscript/generate?session_name=team-alpha"
    status, body = await deferToThread(raw_get, port_of(gw), target, [
        ("Host", "127.0.0.1"), ("X-Forwarded-Host", "gw.example"), ("X-Forwarded-Proto", "https")])
    assert status == 200
    assert setting(body.decode(), "GATEWAY_URL") == "https://gw.example"
    status, body = await deferToThread(raw_get, port_of(gw), target, [
        ("Host", "127.0.0.1"), ("X-Forwarded-Host", 'evil.example"</script>')])
    assert status == 400
    assert json.loads(body)["error"]["code"] == "INVALID_HOST"


@pytest_twisted.ensureDeferred
async def test_route_refuses_hostile_configured_domains(gateway_factory):
    # build_config would refuse this; an embedder building GatewayConfig directly might not
    gw = await gateway_factory(domains=("lmarena.ai", "x.example\n// @require https://evil/"))
    status, _, body = await call("GET", gw.url + "/userscript/generate?session_name=team-alpha")
    assert status == 500
    assert body["error"]["code"] == "INVALID_CONFIG"
    assert "\n" not in body["error"]["message"]
