"""Safe to expose: admin token, registration tokens, client keys, bridge allow-list, limits."""

import base64
import json
import os
import re
import signal
import stat
import subprocess

import openai
import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from support.client import SESSION, call
from support.processes import bin_path, http, wait_for

ADMIN = "admin-token-0123456789abcdef"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
REMOTE = {"X-Forwarded-For": "203.0.113.9"}  # relayed by a proxy: never treated as local
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def captured_log():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def log_text(events) -> str:
    return "\n".join(formatEvent(e) + " " + repr(e) for e in events)


async def script_token(gw, name, headers=AS_ADMIN):
    status, _, text = await call("GET", gw.url + f"/userscript/generate?session_name={name}",
                                 headers=headers)
    assert status == 200
    return re.search(r'var REGISTRATION_TOKEN = "([^"]+)";', text.decode()).group(1)


# --- the admin token ---


@pytest.mark.parametrize("method, path", [
    ("GET", "/session/list"), ("DELETE", "/session/lmarena.ai/team-alpha"),
    ("GET", "/userscript/generate?session_name=team-alpha")])
@pytest_twisted.ensureDeferred
async def test_admin_routes_need_the_token(gateway_factory, method, path):
    gw = await gateway_factory(admin_token=ADMIN)
    await call("POST", gw.url + "/session/register", SESSION, AS_ADMIN)
    status, _, body = await call(method, gw.url + path)
    assert (status, body["error"]["code"]) == (401, "ADMIN_TOKEN_REQUIRED")
    status, _, body = await call(method, gw.url + path, headers={"Authorization": "Bearer wrong-token"})
    # a browser route answers 401 so that the browser asks again
    wrong = 401 if path.startswith("/userscript") else 403
    assert (status, body["error"]["code"]) == (wrong, "ADMIN_TOKEN_INVALID")
    assert gw.store.get("lmarena.ai", "team-alpha") is not None
    status, _, _ = await call(method, gw.url + path, headers=AS_ADMIN)
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_userscript_accepts_basic_auth_for_browsers(gateway_factory):
    gw = await gateway_factory(admin_token=ADMIN)
    url = gw.url + "/userscript/generate?session_name=team-alpha"
    status, headers, _ = await call("GET", url)
    assert status == 401
    assert headers.getRawHeaders("www-authenticate")[0].startswith("Basic")
    basic = base64.b64encode(f"anyone:{ADMIN}".encode()).decode()
    status, _, text = await call("GET", url, headers={"Authorization": f"Basic {basic}"})
    assert status == 200 and b"==UserScript==" in text
    wrong = base64.b64encode(b"anyone:nope").decode()
    status, headers, body = await call("GET", url, headers={"Authorization": f"Basic {wrong}"})
    assert (status, body["error"]["code"]) == (401, "ADMIN_TOKEN_INVALID")
    assert headers.getRawHeaders("www-authenticate")[0].startswith("Basic")


@pytest_twisted.ensureDeferred
async def test_without_a_token_admin_routes_answer_local_clients_only(gateway_factory):
    gw = await gateway_factory()
    status, _, _ = await call("GET", gw.url + "/session/list")
    assert status == 200
    status, _, body = await call("GET", gw.url + "/session/list", headers=REMOTE)
    assert status == 403 and body["error"]["code"] == "ADMIN_LOCAL_ONLY"
    assert "GATEWAY_ADMIN_TOKEN" in body["error"]["message"]


def test_local_client_rule():
    from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
    from twisted.web.test.requesthelper import DummyRequest

    from lmarena_gateway.security import is_local_client

    def request(address, headers=()):
        r = DummyRequest([b""])
        r.client = address
        for name, value in headers:
            r.requestHeaders.setRawHeaders(name, [value])
        return r

    assert is_local_client(request(IPv4Address("TCP", "127.0.0.1", 1)))
    assert is_local_client(request(IPv4Address("TCP", "127.8.9.10", 1)))
    assert is_local_client(request(IPv6Address("TCP", "::1", 1)))
    assert is_local_client(request(IPv6Address("TCP", "::ffff:127.0.0.1", 1)))
    assert is_local_client(request(UNIXAddress(b"/run/lmgateway.sock")))
    assert not is_local_client(request(IPv4Address("TCP", "10.1.2.3", 1)))
    assert not is_local_client(request(IPv6Address("TCP", "2001:db8::1", 1)))
    assert not is_local_client(request(IPv4Address("TCP", "127.0.0.1", 1), [(b"Forwarded", b"for=x")]))


# --- registration tokens ---


@pytest_twisted.ensureDeferred
async def test_registration_needs_a_token_for_its_own_name(gateway_factory):
    gw = await gateway_factory(admin_token=ADMIN)
    token = await script_token(gw, "team-alpha")
    status, _, body = await call("POST", gw.url + "/session/register", SESSION)
    assert (status, body["error"]["code"]) == (401, "REGISTRATION_TOKEN_REQUIRED")
    other = await script_token(gw, "team-beta")
    status, _, body = await call("POST", gw.url + "/session/register",
                                 dict(SESSION, registration_token=other))
    assert (status, body["error"]["code"]) == (403, "REGISTRATION_TOKEN_INVALID")
    assert gw.store.get("lmarena.ai", "team-alpha") is None
    for domain in ("lmarena.ai", "canary.lmarena.ai"):  # any allowed domain
        status, _, _ = await call("POST", gw.url + "/session/register",
                                  dict(SESSION, domain=domain, registration_token=token))
        assert status == 200
    assert gw.store.get("canary.lmarena.ai", "team-alpha") is not None


@pytest.mark.parametrize("extra", [{"bridge_base_url": "http://127.0.0.1:1"},
                                   {"bridge_api_key": "k"}, {"models": {"a": "b"}}])
@pytest_twisted.ensureDeferred
async def test_a_registration_token_cannot_set_bridges_keys_or_models(gateway_factory, extra):
    gw = await gateway_factory(admin_token=ADMIN)
    token = await script_token(gw, "team-alpha")
    status, _, body = await call("POST", gw.url + "/session/register",
                                 dict(SESSION, registration_token=token, **extra))
    assert (status, body["error"]["code"]) == (403, "ADMIN_REQUIRED")
    status, _, _ = await call("POST", gw.url + "/session/register", dict(SESSION, **extra), AS_ADMIN)
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_local_clients_without_an_admin_token_register_freely(gateway_factory):
    gw = await gateway_factory()
    status, _, _ = await call("POST", gw.url + "/session/register", SESSION)
    assert status == 200
    status, _, body = await call("POST", gw.url + "/session/register", SESSION, REMOTE)
    assert (status, body["error"]["code"]) == (401, "REGISTRATION_TOKEN_REQUIRED")


@pytest_twisted.ensureDeferred
async def test_the_script_is_also_served_at_a_user_js_url(gateway_factory):
    gw = await gateway_factory(admin_token=ADMIN)
    status, headers, text = await call("GET", gw.url + "/userscript/team-alpha.user.js", headers=AS_ADMIN)
    assert status == 200 and b"==UserScript==" in text
    assert headers.getRawHeaders("content-type") == ["text/javascript; charset=utf-8"]
    update = re.search(r"// @updateURL\s+(\S+)", text.decode()).group(1)
    assert update.startswith(gw.url + "/userscript/team-alpha.user.js?registration_token=")
    status, _, again = await call("GET", update)  # the update check, with no admin token
    assert status == 200 and again == text
    status, _, body = await call("GET", gw.url + "/userscript/bad%20name.user.js", headers=AS_ADMIN)
    assert (status, body["error"]["code"]) == (400, "INVALID_SESSION_NAME")
    assert (await call("GET", gw.url + "/userscript/team-alpha.user.js"))[0] == 401


@pytest_twisted.ensureDeferred
async def test_the_script_updates_itself_with_its_own_token(gateway_factory):
    gw = await gateway_factory(admin_token=ADMIN)
    token = await script_token(gw, "team-alpha")
    status, _, _ = await call("GET", gw.url + f"/userscript/generate?session_name=team-alpha"
                                              f"&registration_token={token}")
    assert status == 200
    status, _, _ = await call("GET", gw.url + f"/userscript/generate?session_name=team-beta"
                                              f"&registration_token={token}")
    assert status == 401


@pytest_twisted.ensureDeferred
async def test_secret_is_private_and_rotation_revokes_every_token(gateway_factory, reactor):
    gw = await gateway_factory(admin_token=ADMIN)
    secret = gw.service.getServiceNamed("registration-tokens").secret_path
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    token = await script_token(gw, "team-alpha")
    with open(secret + ".new", "w") as f:
        f.write("f" * 64)
    os.replace(secret + ".new", secret)

    async def refused():
        status, _, _ = await call("POST", gw.url + "/session/register",
                                  dict(SESSION, registration_token=token))
        return status == 403

    for _ in range(60):
        if await refused():
            break
        await deferLater(reactor, 0.05, lambda: None)
    assert await refused()
    assert await script_token(gw, "team-alpha") != token


@pytest_twisted.ensureDeferred
@pytest.mark.process
async def test_revoke_one_name(gateway_factory, reactor):
    gw = await gateway_factory(admin_token=ADMIN)
    alpha, beta = await script_token(gw, "team-alpha"), await script_token(gw, "team-beta")
    result = await deferToThread(subprocess.run, [bin_path("lmgateway"), "revoke", "team-alpha",
                                                  "--storage", gw.config.storage],
                                 capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr

    async def status_with(name, token):
        return (await call("POST", gw.url + "/session/register",
                           dict(SESSION, session_name=name, registration_token=token)))[0]

    started = reactor.seconds()
    while await status_with("team-alpha", alpha) != 403:
        assert reactor.seconds() - started < 15, "revocation not seen"
        await deferLater(reactor, 0.05, lambda: None)
    assert await status_with("team-beta", beta) == 200
    fresh = await script_token(gw, "team-alpha")
    assert fresh != alpha and await status_with("team-alpha", fresh) == 200


@pytest_twisted.ensureDeferred
async def test_a_token_registration_keeps_what_the_admin_set(gateway_factory):
    gw = await gateway_factory(admin_token=ADMIN)
    await call("POST", gw.url + "/session/register",
               dict(SESSION, bridge_base_url="http://127.0.0.1:7000", bridge_api_key="team-key",
                    models={"a": "b"}), AS_ADMIN)
    token = await script_token(gw, "team-alpha")
    new_mid = "99999999-8888-4777-8666-555555555555"
    status, _, _ = await call("POST", gw.url + "/session/register",
                              dict(SESSION, message_id=new_mid, registration_token=token))
    assert status == 200
    record = gw.store.get("lmarena.ai", "team-alpha")
    assert record.message_id == new_mid
    assert (record.bridge_base_url, record.bridge_api_key, record.models) == (
        "http://127.0.0.1:7000", "team-key", {"a": "b"})
    # while the admin's own registration replaces the whole record, as in the PHP gateway
    await call("POST", gw.url + "/session/register", SESSION, AS_ADMIN)
    assert gw.store.get("lmarena.ai", "team-alpha").bridge_base_url is None


# --- client API keys ---


@pytest_twisted.ensureDeferred
async def test_client_keys_guard_v1(gateway_factory):
    gw = await gateway_factory(api_keys="key-open-1234; key-scoped-5678 team-beta other")
    await call("POST", gw.url + "/session/register", SESSION)
    headers = {"X-Session-Name": "team-alpha"}
    status, _, body = await call("POST", gw.url + "/v1/chat/completions", CHAT, headers)
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    status, _, body = await call("POST", gw.url + "/v1/chat/completions", CHAT,
                                 {**headers, "Authorization": "Bearer nope"})
    assert status == 401
    status, _, body = await call("POST", gw.url + "/v1/chat/completions", CHAT,
                                 {**headers, "Authorization": "Bearer key-scoped-5678"})
    assert (status, body["error"]["code"]) == (403, "SESSION_NOT_ALLOWED")
    status, _, _ = await call("POST", gw.url + "/v1/chat/completions", CHAT,
                              {**headers, "Authorization": "Bearer key-open-1234"})
    assert status == 200
    assert "authorization" not in gw.bridge.seen[-1]["headers"]  # the client's key stays here
    status, _, _ = await call("GET", gw.url + "/v1/models", headers={"Authorization": "Bearer x"})
    assert status == 401


@pytest_twisted.ensureDeferred
async def test_openai_sdk_sees_an_authentication_error(gateway_factory):
    gw = await gateway_factory(api_keys="sk-good-key-1")
    await call("POST", gw.url + "/session/register", dict(SESSION, session_name="default"))
    bad = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        await deferToThread(bad.models.list)
    assert caught.value.code == "invalid_api_key"
    good = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-good-key-1", max_retries=0)
    models = await deferToThread(lambda: [m.id for m in good.models.list()])
    assert "fake-model" in models


def test_keys_file_is_reread_on_sighup(daemon_factory, fake_bridge_process, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nkey-first-111 default\n")
    daemon = daemon_factory("--api-keys-file", str(keys), "--bridge-url", fake_bridge_process)
    assert "no client API keys configured" not in daemon.log()

    def models_with(key):
        return http("GET", daemon.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})[0]

    assert models_with("key-first-111") == 200 and models_with("key-second-222") == 401
    keys.write_text("key-second-222\n")
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: models_with("key-second-222") == 200, 5, what="the new key to work")
    assert models_with("key-first-111") == 401
    assert daemon.process.poll() is None


def test_emptying_the_keys_file_closes_v1(daemon_factory, fake_bridge_process, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("key-first-111\n")
    daemon = daemon_factory("--api-keys-file", str(keys), "--bridge-url", fake_bridge_process)
    keys.write_text("# every key revoked\n")
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "none left" in daemon.log(), 5, what="the re-read")
    for headers in ({}, {"Authorization": "Bearer key-first-111"}, {"Authorization": "Bearer x"}):
        assert http("GET", daemon.url + "/v1/models", headers=headers)[0] == 401


def test_open_v1_is_warned_about(daemon_factory):
    daemon = daemon_factory()
    assert "no client API keys configured" in daemon.log()


# --- where bridges may be ---


@pytest_twisted.ensureDeferred
async def test_bridge_allow_list_at_registration(gateway_factory):
    gw = await gateway_factory(bridge_url="http://bridge.internal:5102")
    for url, expected in [("http://127.0.0.1:6000", 200), ("http://localhost:6000", 200),
                          ("http://bridge.internal:9999", 200), ("http://[::1]:6000", 200),
                          ("http://169.254.169.254", 400), ("http://evil.example:5102", 400),
                          ("http://10.0.0.5:5102", 400)]:
        status, _, body = await call("POST", gw.url + "/session/register",
                                     dict(SESSION, bridge_base_url=url))
        assert status == expected, url
        if expected == 400:
            assert body["error"]["code"] == "BRIDGE_NOT_ALLOWED"


@pytest_twisted.ensureDeferred
async def test_bridge_allow_list_is_configurable(gateway_factory):
    gw = await gateway_factory(bridge_allow=("*.bridges.example", "10.0.0.0/8"))
    for url, expected in [("http://a.bridges.example", 200), ("http://10.9.8.7:1", 200),
                          ("http://bridges.example", 400), ("http://127.0.0.1:1", 400)]:
        status, _, _ = await call("POST", gw.url + "/session/register",
                                  dict(SESSION, bridge_base_url=url))
        assert status == expected, url


@pytest_twisted.ensureDeferred
async def test_bridge_allow_list_is_checked_again_before_each_request(gateway_factory, tmp_path, reactor):
    from attrs import evolve

    from lmarena_gateway.store.sqlite import SessionFile

    gw = await gateway_factory()
    await call("POST", gw.url + "/session/register", SESSION)
    # a session stored while the list was wider (here: written straight to the store)
    record = evolve(gw.store.get("lmarena.ai", "team-alpha"), session_name="stale",
                    bridge_base_url="http://evil.example:80", bridge_api_key="team-key")
    file = SessionFile(gw.config.storage)
    file.put(record)
    file.close()
    await wait_for_session(gw, reactor, "stale")
    status, _, body = await call("POST", gw.url + "/v1/chat/completions", CHAT, {"X-Session-Name": "stale"})
    assert (status, body["error"]["code"]) == (403, "BRIDGE_NOT_ALLOWED")


async def wait_for_session(gw, reactor, name):
    for _ in range(100):
        if gw.store.get("lmarena.ai", name):
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"session {name} never appeared")


# --- limits and origins ---


@pytest_twisted.ensureDeferred
async def test_sessions_per_domain_limit(gateway_factory):
    gw = await gateway_factory(max_sessions_per_domain=2)
    for name in ("a", "b"):
        assert (await call("POST", gw.url + "/session/register", dict(SESSION, session_name=name)))[0] == 200
    status, _, body = await call("POST", gw.url + "/session/register", dict(SESSION, session_name="c"))
    assert (status, body["error"]["code"]) == (409, "SESSION_LIMIT")
    assert gw.store.get("lmarena.ai", "c") is None
    # updating a session it holds, and another domain, still work
    assert (await call("POST", gw.url + "/session/register", dict(SESSION, session_name="a")))[0] == 200
    assert (await call("POST", gw.url + "/session/register",
                       dict(SESSION, session_name="c", domain="beta.lmarena.ai")))[0] == 200


@pytest_twisted.ensureDeferred
async def test_body_past_the_cap_is_refused_while_arriving(gateway_factory):
    gw = await gateway_factory(max_body=100_000)
    status, _, body = await call("POST", gw.url + "/v1/chat/completions", b"x" * 300_000,
                                 {"X-Session-Name": "team-alpha"})
    assert (status, body["error"]["code"]) == (413, "BODY_TOO_LARGE")


@pytest_twisted.ensureDeferred
async def test_too_many_headers_are_refused(gateway_factory):
    gw = await gateway_factory()
    status, _, _ = await call("GET", gw.url + "/health", headers={f"X-H{i}": "v" for i in range(150)})
    assert status == 400


@pytest_twisted.ensureDeferred
async def test_registration_cors_follows_the_lmarena_domains(gateway_factory):
    gw = await gateway_factory(cors_origins=("*",))
    # A page is never an admin, even on this machine: it registers with its script's token.
    token = await script_token(gw, SESSION["session_name"], headers={})
    status, headers, _ = await call("POST", gw.url + "/session/register",
                                    dict(SESSION, registration_token=token),
                                    {"Origin": "https://canary.lmarena.ai"})
    assert status == 200
    assert headers.getRawHeaders("access-control-allow-origin") == ["https://canary.lmarena.ai"]
    status, headers, body = await call("POST", gw.url + "/session/register",
                                       dict(SESSION, session_name="evil"), {"Origin": "https://evil.example"})
    assert (status, body["error"]["code"]) == (403, "ORIGIN_NOT_ALLOWED")
    assert headers.getRawHeaders("access-control-allow-origin") is None
    assert gw.store.get("lmarena.ai", "evil") is None
    _, headers, _ = await call("OPTIONS", gw.url + "/session/register", headers={"Origin": "https://evil.example"})
    assert headers.getRawHeaders("access-control-allow-origin") is None
    _, headers, _ = await call("GET", gw.url + "/v1/models", headers={"Origin": "https://evil.example"})
    assert headers.getRawHeaders("access-control-allow-origin") == ["*"]


# --- secrets stay secret ---


@pytest_twisted.ensureDeferred
async def test_no_secret_in_logs_errors_or_listings(gateway_factory, captured_log):
    secrets = {"admin": ADMIN, "bridge": "bridge-key-SECRET-1", "client": "client-key-SECRET-2",
               "operator": "operator-key-SECRET-3"}
    gw = await gateway_factory(admin_token=ADMIN, api_keys=secrets["client"], log_requests=True,
                               debug=True, bridge_api_key=secrets["operator"])
    token = await script_token(gw, "team-alpha")
    secrets["registration"] = token
    responses = []
    responses.append(await call("POST", gw.url + "/session/register",
                                dict(SESSION, bridge_api_key=secrets["bridge"],
                                     bridge_base_url="http://127.0.0.1:1"), AS_ADMIN))
    responses.append(await call("POST", gw.url + "/session/register",
                                dict(SESSION, session_name="x", registration_token=token + "x")))
    responses.append(await call("POST", gw.url + "/session/register",
                                dict(SESSION, registration_token=token)))
    responses.append(await call("GET", gw.url + "/session/list", headers=AS_ADMIN))
    responses.append(await call("GET", gw.url + "/session/list",
                                headers={"Authorization": "Bearer " + ADMIN[:-1]}))
    for key in (secrets["client"], "wrong-client-key"):
        responses.append(await call("POST", gw.url + "/v1/chat/completions", CHAT,
                                    {"Authorization": f"Bearer {key}", "X-Session-Name": "team-alpha"}))
    text = json.dumps([[r[0], r[2] if not isinstance(r[2], bytes) else r[2].decode()] for r in responses])
    assert [r[0] for r in responses] == [200, 403, 200, 200, 403, 502, 401]
    assert '"has_bridge_api_key": true' in text
    logged = log_text(captured_log)
    for name, secret in secrets.items():
        assert secret not in text, name
        assert secret not in logged, name


@pytest_twisted.ensureDeferred
async def test_no_userscript_before_the_secret_is_known(gateway_factory, reactor):
    gw = await gateway_factory()
    tokens = gw.service.getServiceNamed("registration-tokens")
    # A reload in flight would bring the secret back: wait until none is, then stop them.
    while tokens._poll.call is None:
        await deferLater(reactor, 0.01, lambda: None)
    tokens._poll.stop()
    tokens._secret = b""  # Redis not answered yet
    status, _, body = await call("GET", gw.url + "/userscript/team-x.user.js")
    assert (status, body["error"]["code"]) == (503, "STORAGE_UNAVAILABLE")
