"""The /v1 proxy over real loopback sockets: streaming, cancellation, errors, headers."""

import json
import socket

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import CancelledError, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.web.client import ResponseNeverReceived

from lmarena_gateway.fakebridge import FakeBridge

from bridges import ChunkCollector, ErrorBridge, HeldBridge, event
from support.client import SESSION, call
from support.processes import free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
HEADERS = {"X-Session-Name": "team-alpha", "X-Target-Domain": "lmarena.ai"}


async def registered(gateway_factory, session=None, **config):
    gw = await gateway_factory(**config)
    status, _, _ = await call("POST", gw.url + "/session/register", session or SESSION)
    assert status == 200
    return gw


async def open_stream(url, body=None, headers=None):
    response = await treq.post(url + "/v1/chat/completions", json=dict(body or CHAT, stream=True),
                               headers=headers or HEADERS, unbuffered=True)
    collector = ChunkCollector()
    response.deliverBody(collector)
    return response, collector


@pytest_twisted.ensureDeferred
async def test_stream_false_or_absent_is_not_streamed(gateway_factory):
    gw = await registered(gateway_factory)
    for body in (CHAT, dict(CHAT, stream=False)):
        status, headers, answer = await call("POST", gw.url + "/v1/chat/completions", body, HEADERS)
        assert status == 200
        assert headers.getRawHeaders("content-type") == ["application/json"]
        assert answer["object"] == "chat.completion"
    assert [seen["body"].get("stream") for seen in gw.bridge.seen] == [None, False]


@pytest_twisted.ensureDeferred
async def test_first_chunk_arrives_while_the_bridge_holds_the_rest(gateway_factory, listen):
    bridge = HeldBridge()
    gw = await registered(gateway_factory, bridge_url=await listen(bridge))
    response, collector = await open_stream(gw.url)
    held = await bridge.arrivals.get()
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    assert response.headers.getRawHeaders("cache-control") == ["no-cache"]
    assert response.headers.getRawHeaders("x-accel-buffering") == ["no"]
    held.write(event("first"))
    assert await collector.chunks.get() == event("first")
    # half an event passes through as it is: no re-assembly of lines
    held.write(b'data: {"half')
    assert await collector.chunks.get() == b'data: {"half'
    held.write(b'": 1}\n\n' + b"data: [DONE]\n\n")
    held.finish()
    await collector.done
    assert collector.received == event("first") + b'data: {"half": 1}\n\ndata: [DONE]\n\n'


@pytest_twisted.ensureDeferred
async def test_client_disconnect_cancels_the_bridge_request(gateway_factory, listen, reactor):
    bridge = HeldBridge()
    gw = await registered(gateway_factory, bridge_url=await listen(bridge))
    response, collector = await open_stream(gw.url)
    held = await bridge.arrivals.get()
    held.write(event("x"))
    await collector.chunks.get()
    collector.transport.stopProducing()  # the client goes away
    # the bridge side sees its connection closed (a generous deadline: it is immediate)
    assert await held.gone.addTimeout(10, reactor) is True


@pytest_twisted.ensureDeferred
async def test_bridge_dying_mid_stream_is_reported(gateway_factory, listen):
    bridge = HeldBridge()
    gw = await registered(gateway_factory, bridge_url=await listen(bridge))
    response, collector = await open_stream(gw.url)
    held = await bridge.arrivals.get()
    held.write(event("partial"))
    await collector.chunks.get()
    held.channel.transport.abortConnection()
    await collector.done
    events = [e for e in collector.received.split(b"\n\n") if e]
    assert events[0] == event("partial").strip()
    error = json.loads(events[1][len(b"data: "):])
    assert error["error"]["code"] == "BRIDGE_STREAM_LOST"
    assert error["error"]["type"] == "bridge_error"
    assert events[2] == b"data: [DONE]"


@pytest_twisted.ensureDeferred
async def test_stream_ending_without_done_is_reported(gateway_factory, listen):
    bridge = HeldBridge()
    gw = await registered(gateway_factory, bridge_url=await listen(bridge))
    response, collector = await open_stream(gw.url)
    held = await bridge.arrivals.get()
    held.write(event("partial"))
    held.finish()
    await collector.done
    assert b'"code": "BRIDGE_STREAM_LOST"' in collector.received
    assert collector.received.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("status, body, message", [
    (503, {"detail": "Browser client not connected"}, "Browser client not connected"),
    (400, {"detail": "no valid session ID"}, "no valid session ID"),
    (404, {"error": "model list empty"}, "model list empty"),
    (500, {"error": {"message": "processing", "type": "internal", "code": "X"}}, "processing"),
    (502, b"<html>bad gateway</html>", "bad gateway"),
])
@pytest_twisted.ensureDeferred
async def test_bridge_error_status_is_kept_in_the_envelope(gateway_factory, listen, status, body, message):
    gw = await registered(gateway_factory, bridge_url=await listen(ErrorBridge(status, body)))
    for stream in (True, False):
        got_status, headers, answer = await call("POST", gw.url + "/v1/chat/completions",
                                                 dict(CHAT, stream=stream), HEADERS)
        assert got_status == status
        assert headers.getRawHeaders("content-type") == ["application/json"]
        assert set(answer["error"]) == {"message", "type", "code"}
        assert message in answer["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_keepalives_and_idle_timeout_on_a_clock(listen, tmp_path, reactor):
    from attrs import evolve

    from lmarena_gateway.bridge import make_http_client
    from lmarena_gateway.config import GatewayConfig
    from lmarena_gateway.gateway import Gateway
    from lmarena_gateway.sessions import validate_registration
    from lmarena_gateway.site import make_site
    from lmarena_gateway.store.sqlite import DBMSessionStore

    bridge = HeldBridge()
    config = evolve(GatewayConfig(), bridge_url=await listen(bridge), keepalive=15,
                    stream_idle_timeout=360, storage=str(tmp_path / "s.db"))
    store = DBMSessionStore(config.storage, reactor)
    store.startService()
    await store.register(validate_registration(SESSION, config.domains), 0)
    clock = Clock()
    client, pool = make_http_client(reactor, config)
    url = await listen(make_site(Gateway(config, store, client, clock)))
    try:
        response, collector = await open_stream(url)
        held = await bridge.arrivals.get()
        clock.advance(14.9)
        clock.advance(0.2)  # 15 s of silence before the first chunk
        assert await collector.chunks.get() == b": keep-alive\n\n"
        held.write(event("a"))
        assert await collector.chunks.get() == event("a")
        clock.advance(10)  # the chunk reset the keep-alive timer: nothing yet
        held.write(b"data: {")  # mid-event: a keep-alive now would corrupt it
        await collector.chunks.get()
        clock.advance(15)
        held.write(b"}\n\n")
        assert await collector.chunks.get() == b"}\n\n"
        clock.advance(15)
        assert await collector.chunks.get() == b": keep-alive\n\n"
        clock.advance(360)  # the bridge is silent for the idle timeout
        await collector.done
        events = [e for e in collector.received.split(b"\n\n") if e.startswith(b"data: ")][-2:]
        error = json.loads(events[0][len(b"data: "):])
        assert error["error"]["code"] == "BRIDGE_TIMEOUT"
        assert "360" in error["error"]["message"]
        assert events[1] == b"data: [DONE]"
        assert await held.gone is True  # and the bridge connection was dropped
    finally:
        await store.stopService()
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_unreachable_bridge_is_502(gateway_factory):
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await registered(gateway_factory, bridge_url=dead)
    status, _, answer = await call("POST", gw.url + "/v1/chat/completions", CHAT, HEADERS)
    assert status == 502
    assert answer["error"]["code"] == "BRIDGE_ERROR"  # the PHP gateway's code
    # the client's user reads which session failed; the URL is for the operator's log
    assert answer["error"]["message"] == "the bridge of session 'team-alpha' is unreachable"
    assert dead not in answer["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_bridge_that_does_not_accept_is_504(gateway_factory):
    # A listening socket with a full accept queue: the kernel drops further SYNs,
    # so connecting hangs as it would to a bridge behind a dead route.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        gw = await registered(gateway_factory, bridge_url=f"http://127.0.0.1:{port}",
                              connect_timeout=0.5, bridge_api_key="operator-SECRET")
        status, _, answer = await call("POST", gw.url + "/v1/chat/completions", CHAT, HEADERS)
        assert status == 504
        assert answer["error"]["code"] == "BRIDGE_TIMEOUT"
        assert answer["error"]["message"] == "the bridge of session 'team-alpha' did not answer in time"
        assert "operator-SECRET" not in json.dumps(answer)
    finally:
        for s in fillers + [server]:
            s.close()


@pytest_twisted.ensureDeferred
async def test_alias_is_applied_and_the_rest_is_unchanged(gateway_factory):
    gw = await registered(gateway_factory, dict(SESSION, models={"gpt-4": "claude-3-5-sonnet"}))
    body = dict(CHAT, model="gpt-4", temperature=0.25, tools=[{"type": "function"}])
    await call("POST", gw.url + "/v1/chat/completions", body, HEADERS)
    await call("POST", gw.url + "/v1/chat/completions", dict(body, model="other"), HEADERS)
    sent = [seen["body"] for seen in gw.bridge.seen]
    assert sent[0] == dict(body, model="claude-3-5-sonnet")
    assert sent[1] == dict(body, model="other")


@pytest_twisted.ensureDeferred
async def test_headers_forwarded_and_client_authorization_dropped(gateway_factory):
    gw = await registered(gateway_factory, bridge_api_key="operator-key")
    status, headers, _ = await call("POST", gw.url + "/v1/chat/completions", CHAT,
                                    {**HEADERS, "Authorization": "Bearer client-key",
                                     "X-Request-ID": "req-123"})
    assert status == 200
    assert headers.getRawHeaders("x-request-id") == ["req-123"]
    seen = gw.bridge.seen[-1]["headers"]
    assert seen["authorization"] == "Bearer operator-key"
    assert seen["x-lmarena-session-id"] == SESSION["session_id"]
    assert seen["x-lmarena-message-id"] == SESSION["message_id"]
    assert seen["x-lmarena-domain"] == "lmarena.ai"
    assert seen["x-request-id"] == "req-123"
    # without a client id one is made up, and returned
    _, headers, _ = await call("POST", gw.url + "/v1/chat/completions", CHAT, HEADERS)
    generated = headers.getRawHeaders("x-request-id")[0]
    assert len(generated) == 32 and gw.bridge.seen[-1]["headers"]["x-request-id"] == generated


@pytest_twisted.ensureDeferred
async def test_operator_key_never_goes_to_a_registered_bridge(gateway_factory, listen, reactor):
    own = FakeBridge(reactor, chunks=2, delay=0)
    own_url = await listen(own.app.resource())
    gw = await registered(gateway_factory, bridge_api_key="operator-key")
    await call("POST", gw.url + "/session/register",
               dict(SESSION, session_name="own", bridge_base_url=own_url))
    await call("POST", gw.url + "/session/register",
               dict(SESSION, session_name="own-keyed", bridge_base_url=own_url, bridge_api_key="team-key"))
    for name in ("own", "own-keyed"):
        status, _, _ = await call("POST", gw.url + "/v1/chat/completions", CHAT,
                                  {"X-Session-Name": name})
        assert status == 200
    assert "authorization" not in own.seen[0]["headers"]
    assert own.seen[1]["headers"]["authorization"] == "Bearer team-key"
    assert gw.bridge.seen == []


@pytest.mark.parametrize("body, code", [
    (b"not json", "INVALID_JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "INVALID_REQUEST"),
    (json.dumps({"model": "m", "messages": []}).encode(), "INVALID_REQUEST"),
    (json.dumps({"model": 5, "messages": [{}]}).encode(), "INVALID_REQUEST"),
    (json.dumps([1, 2]).encode(), "INVALID_REQUEST"),
])
@pytest_twisted.ensureDeferred
async def test_invalid_chat_bodies(gateway_factory, body, code):
    gw = await registered(gateway_factory)
    status, _, answer = await call("POST", gw.url + "/v1/chat/completions", body, HEADERS)
    assert status == 400 and answer["error"]["code"] == code
    assert gw.bridge.seen == []


@pytest_twisted.ensureDeferred
async def test_body_over_the_limit_is_413(gateway_factory):
    gw = await registered(gateway_factory, max_body=1024)
    big = dict(CHAT, messages=[{"role": "user", "content": "x" * 2000}])
    status, _, answer = await call("POST", gw.url + "/v1/chat/completions", big, HEADERS)
    assert status == 413 and answer["error"]["code"] == "BODY_TOO_LARGE"
    assert gw.bridge.seen == []


@pytest.mark.parametrize("headers, status, code", [
    ({"X-Session-Name": "nobody"}, 404, "SESSION_NOT_FOUND"),
    ({"X-Session-Name": "bad name"}, 400, "INVALID_SESSION_NAME"),
    ({"X-Session-Name": "team-alpha", "X-Target-Domain": "evil.example"}, 400, "INVALID_DOMAIN"),
    ({"X-Session-Name": "team-alpha", "X-Target-Domain": "canary.lmarena.ai"}, 404, "SESSION_NOT_FOUND"),
])
@pytest_twisted.ensureDeferred
async def test_session_resolution(gateway_factory, headers, status, code):
    gw = await registered(gateway_factory)
    got, _, answer = await call("POST", gw.url + "/v1/chat/completions", CHAT, headers)
    assert (got, answer["error"]["code"]) == (status, code)
    if code == "SESSION_NOT_FOUND":
        assert "/session/register" in answer["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_default_session_name_and_domain(gateway_factory):
    gw = await registered(gateway_factory, dict(SESSION, session_name="default"))
    status, _, _ = await call("POST", gw.url + "/v1/chat/completions", CHAT)
    assert status == 200
    assert gw.store.get("lmarena.ai", "default").last_used_at is not None


@pytest_twisted.ensureDeferred
async def test_models_without_a_session_and_with_aliases(gateway_factory):
    gw = await gateway_factory()
    status, _, listing = await call("GET", gw.url + "/v1/models")
    assert status == 200
    plain = [m["id"] for m in listing["data"]]
    assert "fake-model" in plain
    await call("POST", gw.url + "/session/register", dict(SESSION, models={"my-gpt": "fake-model"}))
    _, _, listing = await call("GET", gw.url + "/v1/models", headers=HEADERS)
    alias = [m for m in listing["data"] if m["id"] == "my-gpt"]
    assert len(alias) == 1 and "fake-model" in alias[0]["owned_by"]


@pytest_twisted.ensureDeferred
async def test_models_bridge_error_in_the_envelope(gateway_factory, listen):
    gw = await gateway_factory(bridge_url=await listen(ErrorBridge(404, {"error": "no models"})))
    status, _, answer = await call("GET", gw.url + "/v1/models")
    assert status == 404 and "no models" in answer["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_concurrent_streams_on_different_bridges_never_mix(gateway_factory, listen, reactor):
    gw = await gateway_factory()
    texts = {}
    for name in ("red", "blue", "green"):
        text = f"{name} " * 30
        bridge = FakeBridge(reactor, chunks=15, delay=0.001, text=text)
        url = await listen(bridge.app.resource())
        texts[name] = text
        await call("POST", gw.url + "/session/register",
                   dict(SESSION, session_name=name, bridge_base_url=url))

    async def stream(name):
        response, collector = await open_stream(gw.url, headers={"X-Session-Name": name})
        await collector.done
        content = ""
        for block in collector.received.split(b"\n\n"):
            if block.startswith(b"data: {"):
                delta = json.loads(block[6:])["choices"][0]["delta"]
                content += delta.get("content", "")
        return name, content

    from twisted.internet.defer import Deferred

    results = await gatherResults([Deferred.fromCoroutine(stream(name))
                                   for name in texts for _ in range(10)])
    assert len(results) == 30
    for name, content in results:
        assert content == texts[name]


@pytest_twisted.ensureDeferred
async def test_client_leaving_before_the_bridge_answers_is_quiet(gateway_factory, listen):
    from twisted.logger import globalLogPublisher

    bridge = HeldBridge(content_type=b"application/json")
    gw = await registered(gateway_factory, bridge_url=await listen(bridge))
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for path, body in (("/v1/chat/completions", CHAT), ("/v1/models", None)):
            pending = treq.request("POST" if body else "GET", gw.url + path, json=body, headers=HEADERS)
            held = await bridge.arrivals.get()
            pending.cancel()  # the client gives up while the bridge is still thinking
            assert await held.gone is True  # and the gateway dropped the bridge request
            with pytest.raises(ResponseNeverReceived) as failed:
                await pending
            assert failed.value.reasons[0].check(CancelledError)  # our own cancel, nothing else
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not [e for e in events if "log_failure" in e], [e.get("log_format") for e in events]
    _, _, metrics = await call("GET", gw.url + "/metrics")
    assert b"BRIDGE_UNAVAILABLE" not in metrics


@pytest_twisted.ensureDeferred
async def test_bridge_error_bodies_are_capped(gateway_factory, listen):
    huge = {"detail": "x" * (2 * 1024 * 1024)}
    gw = await registered(gateway_factory, bridge_url=await listen(ErrorBridge(500, huge)))
    status, _, answer = await call("POST", gw.url + "/v1/chat/completions", CHAT, HEADERS)
    assert status == 500
    assert set(answer["error"]) == {"message", "type", "code"}
    assert len(answer["error"]["message"]) < 70 * 1024


@pytest_twisted.ensureDeferred
async def test_a_bridge_redirect_is_a_bad_response(gateway_factory, listen):
    gw = await registered(gateway_factory, bridge_url=await listen(ErrorBridge(302, b"")))
    for method, path, body in (("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/models", None)):
        status, _, answer = await call(method, gw.url + path, body, HEADERS)
        assert (status, answer["error"]["code"]) == (502, "BRIDGE_BAD_RESPONSE")
        assert "redirect" in answer["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_statuses_keep_their_reason_phrase(gateway_factory, listen):
    gw = await registered(gateway_factory, bridge_url=await listen(ErrorBridge(429, {"detail": "slow down"})))
    response = await treq.post(gw.url + "/v1/chat/completions", json=CHAT, headers=HEADERS)
    await treq.content(response)
    assert (response.code, response.phrase) == (429, b"Too Many Requests")


@pytest_twisted.ensureDeferred
async def test_every_response_carries_a_request_id(gateway_factory):
    gw = await registered(gateway_factory)
    for method, path, body, headers in [("GET", "/health", None, {}), ("GET", "/nowhere", None, {}),
                                        ("POST", "/v1/chat/completions", b"{", HEADERS),
                                        ("POST", "/session/register", {}, {})]:
        _, got, _ = await call(method, gw.url + path, body, headers)
        assert len(got.getRawHeaders("x-request-id")[0]) == 32, path
    _, got, _ = await call("GET", gw.url + "/health", headers={"X-Request-ID": "mine-1"})
    assert got.getRawHeaders("x-request-id") == ["mine-1"]


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_pauses_the_bridge(gateway_factory, listen, reactor):
    """Backpressure end to end: the gateway does not soak up what the client won't read."""
    from bridges import Flood

    bridge = HeldBridge()
    gw = await registered(gateway_factory, bridge_url=await listen(bridge))
    response, collector = await open_stream(gw.url)
    held = await bridge.arrivals.get()
    limit = 256 * 1024 * 1024
    flood = Flood(held, reactor, b"data: " + b"x" * 65536 + b"\n\n", limit)
    await collector.chunks.get()
    collector.transport.pauseProducing()  # the client stops reading

    # wait until the bridge has been paused and its output stays put
    last, still_since = -1, reactor.seconds()
    deadline = reactor.seconds() + 20
    while reactor.seconds() - still_since < 0.5:
        assert reactor.seconds() < deadline, "the bridge was never paused"
        if flood.produced != last:
            last, still_since = flood.produced, reactor.seconds()
        await deferLater(reactor, 0.05, lambda: None)
    assert flood.paused
    # kernel socket buffers on both hops plus a chunk or two: far below what it would send
    assert flood.produced < 32 * 1024 * 1024, flood.produced

    collector.transport.resumeProducing()  # reading again lets the bridge go on
    resumed_at = flood.produced
    deadline = reactor.seconds() + 10
    while flood.produced <= resumed_at + 4 * 1024 * 1024:
        assert reactor.seconds() < deadline, "the bridge never resumed"
        await deferLater(reactor, 0.02, lambda: None)
    flood.stopProducing()
    collector.transport.stopProducing()
    assert await held.gone is True
