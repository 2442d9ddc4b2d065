"""The /v1 routes in memory: StubTreq on both sides of the gateway, time on a Clock.

The client talks to the site through one StubTreq; the gateway's bridge client is
another, over the FakeBridge or over a resource that answers what a test needs.
test_proxy.py shows the same over loopback sockets; these pin the rules in milliseconds.
"""

from __future__ import annotations

import json

import pytest
from twisted.web.client import ResponseDone
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from support.client import SESSION
from support.stub import Collector, StubGateway, result_of

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
AS_TEAM = {"X-Session-Name": "team-alpha"}


class Answering(Resource):
    """A bridge that answers every request with one status, headers and body."""

    isLeaf = True

    def __init__(self, status: int, body: bytes | dict, headers: dict | None = None) -> None:
        super().__init__()
        self.status = status
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.headers = {b"Content-Type": b"application/json", **(headers or {})}

    def render(self, request):
        request.setResponseCode(self.status)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return self.body


class Held(Resource):
    """A bridge that keeps each request open for the test to write to (or not)."""

    isLeaf = True

    def __init__(self, content_type: bytes = b"text/event-stream", headers_now: bool = True) -> None:
        super().__init__()
        self.content_type = content_type
        self.headers_now = headers_now
        self.requests: list = []
        self.lost: list = []

    def render(self, request):
        request.setHeader(b"Content-Type", self.content_type)
        if self.headers_now:
            request.write(b"")
        request.notifyFinish().addErrback(self.lost.append)
        self.requests.append(request)
        return NOT_DONE_YET


# --- session resolution ---


def test_an_unknown_session_is_404_and_reaches_no_bridge():
    gw = StubGateway()
    answer = gw.call("POST", "/v1/chat/completions", CHAT, {"X-Session-Name": "nobody"})
    assert (answer.status, answer.code) == (404, "SESSION_NOT_FOUND")
    assert "/session/register" in answer.json()["error"]["message"]
    assert gw.fake.seen == []


def test_the_bridge_receives_the_session_ids_and_the_aliased_model():
    gw = StubGateway()
    gw.register(models={"gpt-4": "claude-3-5-sonnet"})
    body = dict(CHAT, model="gpt-4", temperature=0.25)
    answer = gw.call("POST", "/v1/chat/completions", body, {**AS_TEAM, "X-Request-ID": "req-7",
                                                            "Authorization": "Bearer client-key"})
    assert answer.status == 200
    seen = gw.fake.seen[-1]
    assert seen["body"] == dict(body, model="claude-3-5-sonnet")
    assert seen["headers"]["x-lmarena-session-id"] == SESSION["session_id"]
    assert seen["headers"]["x-lmarena-message-id"] == SESSION["message_id"]
    assert seen["headers"]["x-lmarena-domain"] == "lmarena.ai"
    assert seen["headers"]["x-request-id"] == "req-7"
    assert "authorization" not in seen["headers"]  # the client's key stays here


def test_a_model_without_an_alias_is_sent_as_it_came():
    gw = StubGateway()
    gw.register(models={"gpt-4": "claude-3-5-sonnet"})
    gw.call("POST", "/v1/chat/completions", dict(CHAT, model="other"), AS_TEAM)
    assert gw.fake.seen[-1]["body"]["model"] == "other"


def test_a_use_is_noted_at_the_clock_s_time():
    gw = StubGateway()
    gw.register()
    gw.clock.advance(90)
    gw.call("POST", "/v1/chat/completions", CHAT, AS_TEAM)
    assert gw.store.get("lmarena.ai", "team-alpha").last_used_at == gw.clock.seconds()


def test_the_operator_key_goes_only_to_the_default_bridge():
    gw = StubGateway(bridge_api_key="operator-key")
    gw.register()
    gw.register(session_name="own", bridge_base_url="http://127.0.0.2:5102")
    gw.register(session_name="own-keyed", bridge_base_url="http://127.0.0.2:5102",
                bridge_api_key="team-key")
    for name in ("team-alpha", "own", "own-keyed"):
        assert gw.call("POST", "/v1/chat/completions", CHAT, {"X-Session-Name": name}).status == 200
    default, own, keyed = (seen["headers"] for seen in gw.fake.seen)
    assert (default["host"], default["authorization"]) == ("bridge.test:5102", "Bearer operator-key")
    assert own["host"] == "127.0.0.2:5102" and "authorization" not in own
    assert keyed["authorization"] == "Bearer team-key"


def test_models_list_adds_the_session_s_aliases():
    gw = StubGateway()
    gw.register(models={"my-gpt": "fake-model"})
    plain = [m["id"] for m in gw.call("GET", "/v1/models").json()["data"]]
    assert "fake-model" in plain and "my-gpt" not in plain
    aliased = gw.call("GET", "/v1/models", headers=AS_TEAM).json()["data"]
    alias = [m for m in aliased if m["id"] == "my-gpt"]
    assert len(alias) == 1 and "fake-model" in alias[0]["owned_by"]


# --- answers relayed ---


def test_a_json_answer_is_relayed_as_it_came():
    gw = StubGateway()
    gw.register()
    answer = gw.call("POST", "/v1/chat/completions", CHAT, AS_TEAM)
    assert answer.status == 200
    assert answer.header("content-type") == "application/json"
    assert answer.json()["choices"][0]["message"]["content"] == gw.fake.text


def test_a_stream_is_relayed_event_by_event_as_the_bridge_sends():
    gw = StubGateway()
    gw.register()
    response, body = gw.open("POST", "/v1/chat/completions", dict(CHAT, stream=True), AS_TEAM)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    assert response.headers.getRawHeaders("x-accel-buffering") == ["no"]
    assert body.received.count(b"data: ") == 1  # the rest is still on the bridge's clock
    gw.clock.advance(1.0)
    gw.settle()
    assert body.received.count(b"data: ") == 2
    for _ in range(4):
        gw.clock.advance(1.0)
        gw.settle()
    assert body.received.endswith(b"data: [DONE]\n\n")
    assert body.reason is not None and body.reason.check(ResponseDone)
    text = "".join(json.loads(event[6:])["choices"][0]["delta"].get("content", "")
                   for event in body.received.split(b"\n\n") if event.startswith(b"data: {"))
    assert text == gw.fake.text


def test_a_stream_the_bridge_ends_early_ends_with_an_error_event():
    bridge = Held()
    gw = StubGateway(bridge)
    gw.register()
    _, body = gw.open("POST", "/v1/chat/completions", dict(CHAT, stream=True), AS_TEAM)
    bridge.requests[0].write(b'data: {"partial": 1}\n\n')
    bridge.requests[0].finish()
    gw.settle()
    events = [e for e in body.received.split(b"\n\n") if e]
    assert events[0] == b'data: {"partial": 1}'
    assert json.loads(events[1][6:])["error"]["code"] == "BRIDGE_STREAM_LOST"
    assert events[2] == b"data: [DONE]"


def test_a_json_body_cut_short_never_looks_complete():
    bridge = Held(content_type=b"application/json")
    gw = StubGateway(bridge)
    gw.register()
    pending = gw.send("POST", "/v1/chat/completions", CHAT, AS_TEAM, unbuffered=True)
    held = bridge.requests[0]
    held.write(b'{"id": "chatcmpl-1", "choi')  # a JSON answer's headers go with its first bytes
    gw.settle()
    response = result_of(pending)
    assert response.code == 200
    body = Collector()
    response.deliverBody(body)
    held.channel.transport.loseConnection()  # gone mid-body, without the chunked terminator
    gw.settle()
    assert body.received == b'{"id": "chatcmpl-1", "choi'
    assert body.reason is not None and not body.reason.check(ResponseDone)


# --- bridge errors, in the envelope ---


@pytest.mark.parametrize("status, payload, code, message", [
    (503, {"detail": "Browser client not connected"}, "BRIDGE_NOT_READY", "Browser client not connected"),
    (404, {"error": "model not found"}, "BRIDGE_NOT_FOUND", "model not found"),
    (500, {"error": {"message": "processing", "type": "internal", "code": "X_FAILED"}},
     "X_FAILED", "processing"),
    (502, b"<html>bad gateway</html>", "BRIDGE_ERROR", "bad gateway"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_a_bridge_error_keeps_its_status_in_the_envelope(status, payload, code, message, stream):
    gw = StubGateway(Answering(status, payload))
    gw.register()
    answer = gw.call("POST", "/v1/chat/completions", dict(CHAT, stream=stream), AS_TEAM)
    assert answer.status == status
    assert answer.header("content-type") == "application/json"
    assert set(answer.json()["error"]) == {"message", "type", "code"}
    assert answer.code == code
    assert message in answer.json()["error"]["message"]


def test_a_bridge_not_ready_says_do_not_retry():
    gw = StubGateway(Answering(503, {"detail": "no tab"}))
    gw.register()
    answer = gw.call("POST", "/v1/chat/completions", CHAT, AS_TEAM)
    assert answer.header("x-should-retry") == "false"


def test_the_bridge_s_retry_after_is_passed_on_only_when_it_is_a_number():
    gw = StubGateway(Answering(429, {"detail": "slow down"}, {b"Retry-After": b"17"}))
    gw.register()
    answer = gw.call("POST", "/v1/chat/completions", CHAT, AS_TEAM)
    assert (answer.status, answer.code, answer.header("retry-after")) == (429, "BRIDGE_RATE_LIMITED", "17")
    assert answer.response.phrase == b"Too Many Requests"
    odd = StubGateway(Answering(429, {"detail": "x"}, {b"Retry-After": b"soon"}))
    odd.register()
    assert odd.call("POST", "/v1/chat/completions", CHAT, AS_TEAM).header("retry-after") is None


@pytest.mark.parametrize("method, path, body", [("POST", "/v1/chat/completions", CHAT),
                                                ("GET", "/v1/models", None)])
def test_a_bridge_redirect_is_a_bad_response(method, path, body):
    gw = StubGateway(Answering(302, b"", {b"Location": b"http://elsewhere.test/"}))
    gw.register()
    answer = gw.call(method, path, body, AS_TEAM)
    assert (answer.status, answer.code) == (502, "BRIDGE_BAD_RESPONSE")
    assert "redirect" in answer.json()["error"]["message"]


def test_an_unreadable_model_list_is_a_bad_response():
    gw = StubGateway(Answering(200, {"object": "list"}))
    answer = gw.call("GET", "/v1/models")
    assert (answer.status, answer.code) == (502, "BRIDGE_BAD_RESPONSE")


# --- the idle timeout, on the Clock ---


def test_a_bridge_that_never_answers_is_504_after_the_idle_timeout():
    bridge = Held(content_type=b"application/json", headers_now=False)
    gw = StubGateway(bridge, stream_idle_timeout=30)
    gw.register()
    answered: list = []
    gw.send("POST", "/v1/chat/completions", CHAT, AS_TEAM).addCallback(answered.append)
    gw.clock.advance(29.9)
    gw.settle()
    assert answered == []
    gw.clock.advance(0.2)
    gw.settle()
    response = answered[0]
    body = gw.client.content(response)
    gw.settle()
    error = json.loads(result_of(body))["error"]
    assert (response.code, error["code"]) == (504, "BRIDGE_TIMEOUT")
    assert error["message"] == "the bridge of session 'team-alpha' did not answer in time"
    assert len(bridge.lost) == 1  # and the bridge request was dropped


def test_a_silent_stream_ends_with_a_timeout_event_and_drops_the_bridge():
    bridge = Held()
    gw = StubGateway(bridge, stream_idle_timeout=30, keepalive=0)
    gw.register()
    _, body = gw.open("POST", "/v1/chat/completions", dict(CHAT, stream=True), AS_TEAM)
    gw.clock.advance(20)
    bridge.requests[0].write(b'data: {"a": 1}\n\n')
    gw.settle()
    gw.clock.advance(29)  # 49 s since the stream opened, but the chunk restarted the timer
    gw.settle()
    assert body.reason is None and bridge.lost == []
    gw.clock.advance(1.5)
    gw.settle()
    events = [e for e in body.received.split(b"\n\n") if e]
    error = json.loads(events[-2][6:])["error"]
    assert error["code"] == "BRIDGE_TIMEOUT" and "30" in error["message"]
    assert events[-1] == b"data: [DONE]"
    assert body.reason.check(ResponseDone)
    assert len(bridge.lost) == 1


def test_a_json_answer_silent_after_its_headers_is_504_in_the_envelope():
    bridge = Held(content_type=b"application/json")
    gw = StubGateway(bridge, stream_idle_timeout=30)
    gw.register()
    pending = gw.send("POST", "/v1/chat/completions", CHAT, AS_TEAM)
    gw.clock.advance(31)
    gw.settle()
    response = result_of(pending)
    body = gw.client.content(response)
    gw.settle()
    assert response.code == 504
    assert json.loads(result_of(body))["error"]["code"] == "BRIDGE_TIMEOUT"
    assert len(bridge.lost) == 1
