"""A bridge that echoes what it was sent shows no secret to the client, the metrics or the log."""

import json

import pytest
import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource

from support.client import SESSION, call

SESSION_KEY = "sk-session-bridge-key-SECRET-1"
DEFAULT_KEY = "sk-default-bridge-key-SECRET-2"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class EchoingBridge(Resource):
    """Every answer is an error that quotes the request's Authorization header back."""

    isLeaf = True

    def __init__(self, shape: str) -> None:
        super().__init__()
        self.shape = shape

    def render(self, request):
        sent = (request.getHeader(b"authorization") or b"").decode()
        request.setResponseCode(401)
        request.setHeader(b"Content-Type", b"application/json")
        if self.shape == "detail":
            return json.dumps({"detail": f"invalid credentials: {sent}"}).encode()
        if self.shape == "envelope":
            return json.dumps({"error": {"message": f"rejected {sent}", "type": sent,
                                         "code": sent.split()[-1]}}).encode()
        return f"<html>401: {sent}</html>".encode()


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.mark.parametrize("shape", ["detail", "envelope", "text"])
@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT),
                                        ("/v1/chat/completions", dict(CHAT, stream=True)),
                                        ("/v1/models", None)])
@pytest_twisted.ensureDeferred
async def test_an_echoed_bridge_key_is_redacted(gateway_factory, listen, logged, shape, path, body):
    bridge_url = await listen(EchoingBridge(shape))
    gw = await gateway_factory(bridge_url=bridge_url, bridge_api_key=DEFAULT_KEY)
    status, _, _ = await call("POST", gw.url + "/session/register", dict(
        SESSION, bridge_base_url=bridge_url, bridge_api_key=SESSION_KEY))
    assert status == 200
    headers = {"X-Session-Name": SESSION["session_name"]}
    status, _, answer = await call("POST" if body else "GET", gw.url + path, body, headers)
    assert status == 401
    text = json.dumps(answer)
    assert SESSION_KEY not in text and "[redacted]" in text
    _, _, metrics = await call("GET", gw.url + "/metrics")
    assert SESSION_KEY not in metrics.decode()
    assert SESSION_KEY not in "\n".join(formatEvent(e) + repr(e) for e in logged)


@pytest_twisted.ensureDeferred
async def test_the_default_bridge_key_is_redacted_too(gateway_factory, listen):
    gw = await gateway_factory(bridge_url=await listen(EchoingBridge("detail")),
                               bridge_api_key=DEFAULT_KEY)
    await call("POST", gw.url + "/session/register", SESSION)
    status, _, answer = await call("POST", gw.url + "/v1/chat/completions", CHAT,
                                   {"X-Session-Name": SESSION["session_name"]})
    assert status == 401
    assert DEFAULT_KEY not in json.dumps(answer)
    assert "invalid credentials: Bearer [redacted]" in answer["error"]["message"]
