"""Random JSON, headers and paths at register, list, delete and chat (hypothesis).

Whatever arrives: never a 5xx, never a stored record that fails validation, never a
secret in a response. A real daemon over loopback, in front of a real fake bridge.
"""

import http.client as httpclient
import json
import subprocess
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.client import SESSION
from support.processes import Daemon, bin_path, free_port, http, wait_for

ADMIN = "fuzz-admin-token-0123456789"
CLIENT_KEY = "fuzz-client-key-abcdef"
BRIDGE_KEY = "fuzz-bridge-key-SECRET"
DOMAINS = ["lmarena.ai", "canary.lmarena.ai", "alpha.lmarena.ai", "beta.lmarena.ai", "arena.ai"]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    bridge = subprocess.Popen([bin_path("lmgateway"), "fake-bridge", "--listen",
                               f"tcp:{port}:interface=127.0.0.1", "--delay-ms", "0", "--chunks", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bridge_url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _up(bridge_url), 15, what="fake bridge")
    daemon = Daemon(tmp, ["--bridge-url", bridge_url, "--max-sessions-per-domain", "50"],
                    {"GATEWAY_ADMIN_TOKEN": ADMIN, "GATEWAY_API_KEYS": CLIENT_KEY})
    daemon.start()
    status, _, _ = http("POST", daemon.url + "/session/register",
                        dict(SESSION, bridge_api_key=BRIDGE_KEY, bridge_base_url=bridge_url,
                             models={"alias": "fake-model"}),
                        headers={"Authorization": f"Bearer {ADMIN}"})
    assert status == 200
    _, _, script = http("GET", daemon.url + "/userscript/generate?session_name=team-alpha",
                        headers={"Authorization": f"Bearer {ADMIN}"})
    token = script.decode().split('var REGISTRATION_TOKEN = "', 1)[1].split('"', 1)[0]
    yield daemon, {"admin": ADMIN, "client": CLIENT_KEY, "bridge": BRIDGE_KEY, "registration": token}
    daemon.stop()
    bridge.kill()
    bridge.wait()


def _up(url):
    try:
        return http("GET", url + "/v1/models", timeout=1)[0] == 200
    except OSError:
        return False


def send(daemon, method, path, body=None, headers=()):
    connection = httpclient.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        data = b"" if body is None else body
        connection.putheader("Content-Length", str(len(data)))
        connection.endheaders(data)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=8)
uuids = st.uuids().map(str) | st.text(max_size=40)
register_bodies = st.fixed_dictionaries({}, optional={
    "domain": st.sampled_from(DOMAINS) | json_values,
    "session_name": st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True) | json_values,
    "session_id": uuids | json_values,
    "message_id": uuids | json_values,
    "bridge_base_url": st.sampled_from(["http://127.0.0.1:1", "file:///etc/passwd", "http://x@y",
                                        "http://evil.example", "https://[::1]:9/"]) | json_values,
    "bridge_api_key": st.text(max_size=20) | json_values,
    "models": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3) | json_values,
    "registration_token": st.just("TOKEN") | st.text(max_size=20) | json_values,
})
header_names = st.sampled_from(["X-Session-Name", "X-Target-Domain", "Authorization", "Origin",
                                "X-Request-ID", "Content-Type", "X-Forwarded-For", "X-Forwarded-Host",
                                "Transfer-Encoding", "Host"])
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40) | st.sampled_from(
    ["Bearer ADMIN", "Bearer CLIENT", "team-alpha", "lmarena.ai", "https://lmarena.ai", "chunked"])
headers = st.lists(st.tuples(header_names, header_values), max_size=5)
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck),
                    derandomize=True)


def fill(value, secrets):
    """Let generated text name real credentials, so authorized paths get exercised too."""
    if isinstance(value, str):
        return (value.replace("ADMIN", secrets["admin"]).replace("CLIENT", secrets["client"])
                .replace("TOKEN", secrets["registration"]))
    if isinstance(value, dict):
        return {fill(k, secrets): fill(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, secrets) for v in value]
    return value


def check(status, body, secrets):
    assert status < 500 or status in (502, 504), (status, body[:300])
    text = body.decode("utf-8", "replace")
    for name in ("admin", "client", "bridge", "registration"):
        assert secrets[name] not in text, f"{name} secret in a {status} response"


@SETTINGS
@given(body=register_bodies | json_values, extra=headers, raw=st.binary(max_size=50) | st.none())
def test_register(target, body, extra, raw):
    daemon, secrets = target
    payload = raw if raw is not None else json.dumps(fill(body, secrets)).encode()
    status, answer = send(daemon, "POST", "/session/register", payload, fill(extra, secrets))
    check(status, answer, secrets)


@SETTINGS
@given(query=st.text(max_size=30), extra=headers)
def test_list(target, query, extra):
    daemon, secrets = target
    status, answer = send(daemon, "GET", "/session/list?domain=" + quote(query), None, fill(extra, secrets))
    check(status, answer, secrets)


@SETTINGS
@given(path=st.lists(st.text(max_size=20), min_size=0, max_size=4), extra=headers)
def test_delete(target, path, extra):
    daemon, secrets = target
    target_path = "/session/" + "/".join(quote(p, safe="%") for p in path)
    status, answer = send(daemon, "DELETE", target_path, None, fill(extra, secrets))
    check(status, answer, secrets)


CHAT_BODIES = st.fixed_dictionaries({
    "model": st.sampled_from(["alias", "m"]) | json_values,
    "messages": json_values | st.just([{"role": "user", "content": "hi"}]),
    "stream": json_values})


@SETTINGS
@given(body=json_values | CHAT_BODIES,
       extra=headers)
def test_chat(target, body, extra):
    daemon, secrets = target
    status, answer = send(daemon, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                          fill(extra, secrets))
    check(status, answer, secrets)


def test_everything_stored_still_passes_validation(target):
    """Runs after the others in this module: the store holds only valid records."""
    daemon, _ = target
    exported = subprocess.run([bin_path("lmgateway"), "export", "--storage", daemon.storage],
                              capture_output=True, text=True, timeout=30)
    data = json.loads(exported.stdout)
    from lmarena_gateway.sessions import validate_registration

    count = 0
    for domain, sessions in data["domains"].items():
        for name, fields in sessions.items():
            validate_registration(dict(fields, domain=domain, session_name=name), DOMAINS)
            count += 1
    assert count >= 1
