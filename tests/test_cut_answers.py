"""A non-stream answer the bridge cannot complete never looks complete to the client.

The bridge closes, resets or goes silent mid-body: the gateway aborts the client's
connection instead of ending the chunked body cleanly, so curl exits non-zero and the
openai SDK raises. Before the first byte it can still answer, and does, with a 502.
"""

import openai
import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.web.client import ResponseDone

from bridges import ChunkCollector, HeldBridge
from support.client import SESSION, call

MESSAGES = [{"role": "user", "content": "Hello!"}]
HEADERS = {"X-Session-Name": "team-alpha", "X-Target-Domain": "lmarena.ai"}
HALF = b'{"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"index": 0, "mess'


def cut(held, how: str) -> None:
    if how == "closes":
        held.channel.transport.loseConnection()
    elif how == "resets":
        held.channel.transport.abortConnection()
    # "goes silent": nothing; the gateway's idle timeout ends it


async def gateway_with_held_bridge(gateway_factory, listen):
    bridge = HeldBridge(content_type=b"application/json")
    gw = await gateway_factory(bridge_url=await listen(bridge), stream_idle_timeout=1.0)
    status, _, _ = await call("POST", gw.url + "/session/register", SESSION)
    assert status == 200
    return gw, bridge


@pytest.mark.parametrize("how", ["closes", "resets", "goes silent"])
@pytest_twisted.ensureDeferred
async def test_the_sdk_raises_when_the_bridge_cuts_the_body(gateway_factory, listen, reactor, how):
    gw, bridge = await gateway_with_held_bridge(gateway_factory, listen)
    # The gateway sends its headers with the first bytes of the body: once the SDK has
    # them, the bridge's half answer has reached the gateway, and a reset cannot drop it.
    headers_in: Deferred = Deferred()
    seen = openai.DefaultHttpxClient(event_hooks={"response": [
        lambda response: reactor.callFromThread(headers_in.callback, None)]})
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-x", max_retries=0, timeout=20,
                           default_headers=HEADERS, http_client=seen)
    asking = deferToThread(client.chat.completions.create, model="m", messages=MESSAGES)
    held = await bridge.arrivals.get()
    held.write(HALF)
    await headers_in
    cut(held, how)
    with pytest.raises(openai.APIConnectionError):
        await asking


@pytest.mark.parametrize("how", ["closes", "resets", "goes silent"])
@pytest_twisted.ensureDeferred
async def test_the_chunked_body_is_never_terminated(gateway_factory, listen, how):
    gw, bridge = await gateway_with_held_bridge(gateway_factory, listen)
    asking = treq.post(gw.url + "/v1/chat/completions", json={"model": "m", "messages": MESSAGES},
                       headers=HEADERS, unbuffered=True)
    held = await bridge.arrivals.get()
    held.write(HALF)
    response = await asking  # the gateway's headers come with the first bytes
    assert response.code == 200
    collector = ChunkCollector()
    response.deliverBody(collector)
    assert await collector.chunks.get() == HALF
    cut(held, how)
    reason = await collector.done
    assert not isinstance(reason, ResponseDone)  # a clean end would read as a whole answer
    assert collector.received == HALF


@pytest_twisted.ensureDeferred
async def test_a_bridge_lost_before_the_first_byte_is_a_502(gateway_factory, listen):
    gw, bridge = await gateway_with_held_bridge(gateway_factory, listen)
    asking = ensureDeferred(call("POST", gw.url + "/v1/chat/completions",
                                 {"model": "m", "messages": MESSAGES}, HEADERS))
    held = await bridge.arrivals.get()
    held.channel.transport.loseConnection()  # after the headers, before any of the body
    status, _, body = await asking
    assert status == 502
    assert body["error"]["code"] == "BRIDGE_STREAM_LOST"
    assert "before the answer was complete" in body["error"]["message"] or \
        "lost" in body["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_a_bridge_silent_before_the_first_byte_is_a_504(gateway_factory, listen):
    gw, bridge = await gateway_with_held_bridge(gateway_factory, listen)
    asking = ensureDeferred(call("POST", gw.url + "/v1/chat/completions",
                                 {"model": "m", "messages": MESSAGES}, HEADERS))
    await bridge.arrivals.get()
    status, _, body = await asking  # the gateway's idle timeout (1 s here) ends it
    assert (status, body["error"]["code"]) == (504, "BRIDGE_TIMEOUT")
