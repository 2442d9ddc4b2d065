"""The bridge hot path in memory: what goes on the wire, and what is left to treq."""

from __future__ import annotations

import io

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface.verify import verifyObject

from lmarena_gateway.bodies import CHUNK, FileBody
from lmarena_gateway.bridge_client import BridgeClient, BytesProducer, FileProducer


class RecordingAgent:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.calls.append((method, uri, headers, bodyProducer))
        return "agent's deferred"


class RecordingTreq:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def request(self, method, url, **kwargs):
        self.calls.append((method, url, kwargs))
        return "treq's deferred"


def test_bytes_producer_writes_the_body_at_once_with_its_length():
    producer = BytesProducer(b'{"a": 1}')
    verifyObject(IBodyProducer, producer)
    assert producer.length == 8
    consumer = StringTransport()
    done = producer.startProducing(consumer)
    assert consumer.value() == b'{"a": 1}'
    assert done.called


def test_a_proxy_request_goes_straight_to_the_agent():
    agent, treq = RecordingAgent(), RecordingTreq()
    client = BridgeClient(agent, fallback=treq)
    headers = Headers({b"X-Request-ID": [b"r1"]})
    answer = client.request("POST", "http://127.0.0.1:5102/v1/chat/completions", data=b"{}",
                            headers=headers, allow_redirects=False, unbuffered=True)
    assert answer == "agent's deferred"
    [(method, uri, sent_headers, producer)] = agent.calls
    assert (method, uri) == (b"POST", b"http://127.0.0.1:5102/v1/chat/completions")
    assert sent_headers is headers
    assert producer.body == b"{}"
    assert treq.calls == []


def test_a_get_without_a_body_has_no_producer():
    agent = RecordingAgent()
    BridgeClient(agent, fallback=RecordingTreq()).request(
        "GET", "http://127.0.0.1:5102/v1/models", headers=None, allow_redirects=False,
        unbuffered=True)
    assert agent.calls == [(b"GET", b"http://127.0.0.1:5102/v1/models", None, None)]


def test_any_other_request_is_treqs():
    agent, treq = RecordingAgent(), RecordingTreq()
    client = BridgeClient(agent, fallback=treq)
    client.request("GET", "http://127.0.0.1:5102/", allow_redirects=False, unbuffered=True,
                   params={"a": "b"})
    client.request("GET", "http://127.0.0.1:5102/")  # follows redirects, buffers
    client.request("POST", "http://127.0.0.1:5102/", json={"a": 1}, allow_redirects=False,
                   unbuffered=True)
    client.request("GET", "http://bücher.example/", allow_redirects=False, unbuffered=True)
    assert agent.calls == []
    assert [call[1] for call in treq.calls] == ["http://127.0.0.1:5102/"] * 3 + [
        "http://bücher.example/"]


def test_on_a_real_agent_the_request_is_plain_http_without_gzip():
    """treq's ContentDecoderAgent asked for gzip; a bridge's stream must come as it is."""
    reactor = MemoryReactorClock()
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=True))
    client = BridgeClient(agent)
    answered = client.request("POST", "http://127.0.0.1:5102/v1/chat/completions",
                              data=b'{"model": "m"}',
                              headers=Headers({b"Content-Type": [b"application/json"]}),
                              allow_redirects=False, unbuffered=True)
    [(host, port, factory, _, _)] = reactor.tcpClients
    assert (host, port) == ("127.0.0.1", 5102)
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport()
    protocol.makeConnection(transport)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    fields = {line.split(b": ", 1)[0].lower(): line.split(b": ", 1)[1] for line in lines[1:]}
    assert fields[b"content-length"] == b"14"
    assert fields[b"host"] == b"127.0.0.1:5102"
    assert b"accept-encoding" not in fields and b"cookie" not in fields
    assert body == b'{"model": "m"}'
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    response = []
    answered.addCallback(response.append)
    assert response[0].code == 200


def uri(text: bytes):
    from twisted.web.client import URI

    return URI.fromBytes(text)


class RecordingPolicy:
    def __init__(self) -> None:
        self.netlocs: list = []

    def creatorForNetloc(self, hostname, port):
        self.netlocs.append((hostname, port))
        return object()


def test_an_ip_literal_bridge_connects_without_the_resolver_on_one_kept_endpoint():
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

    from lmarena_gateway.bridge_client import BridgeEndpoints

    reactor = MemoryReactorClock()
    endpoints = BridgeEndpoints(reactor, connect_timeout=3.0, tls_policy=RecordingPolicy())
    first = endpoints.endpointForURI(uri(b"http://127.0.0.1:5102/v1/models"))
    assert isinstance(first, TCP4ClientEndpoint)
    assert endpoints.endpointForURI(uri(b"http://127.0.0.1:5102/v1/chat/completions")) is first
    assert isinstance(endpoints.endpointForURI(uri(b"http://[::1]:5102/")), TCP6ClientEndpoint)
    first.connect(HTTPConnectionPool(reactor)._factory(lambda: None, "key"))
    [(host, port, _, timeout, _)] = reactor.tcpClients  # at once: nothing was resolved
    assert (host, port, timeout) == ("127.0.0.1", 5102, 3.0)


def test_names_and_https_get_what_agent_would_give_them():
    from twisted.internet.endpoints import HostnameEndpoint
    from twisted.web.error import SchemeNotSupported

    from lmarena_gateway.bridge_client import BridgeEndpoints

    policy = RecordingPolicy()
    endpoints = BridgeEndpoints(MemoryReactorClock(), connect_timeout=None, tls_policy=policy)
    assert isinstance(endpoints.endpointForURI(uri(b"http://localhost:5102/")), HostnameEndpoint)
    tls = endpoints.endpointForURI(uri(b"https://bridge.example/"))
    assert not isinstance(tls, HostnameEndpoint)  # wrapped in TLS
    assert endpoints.endpointForURI(uri(b"https://bridge.example/x")) is tls
    assert policy.netlocs == [(b"bridge.example", 443)]
    try:
        endpoints.endpointForURI(uri(b"ftp://127.0.0.1/"))
    except SchemeNotSupported:
        pass
    else:
        raise AssertionError("ftp was accepted")


def test_kept_endpoints_are_bounded():
    from lmarena_gateway.bridge_client import BridgeEndpoints

    endpoints = BridgeEndpoints(MemoryReactorClock(), connect_timeout=1.0,
                                tls_policy=RecordingPolicy(), limit=3)
    for port in range(1, 11):
        endpoints.endpointForURI(uri(b"http://127.0.0.1:%d/" % port))
    assert len(endpoints._known) <= 3


class Pausing(StringTransport):
    """A consumer whose buffer is full after every write, until the test drains it."""

    def __init__(self, producer) -> None:
        super().__init__()
        self.producer = producer
        self.writes: list[int] = []

    def write(self, data: bytes) -> None:
        super().write(data)
        self.writes.append(len(data))
        self.producer.pauseProducing()


def test_a_large_body_is_forwarded_from_its_file_a_piece_a_turn():
    raw = bytes(range(256)) * (3 * CHUNK // 256) + b"tail"
    clock = Clock()
    producer = FileProducer(FileBody.of(io.BytesIO(raw)), clock)
    verifyObject(IBodyProducer, producer)
    assert producer.length == len(raw)
    consumer = Pausing(producer)
    done = producer.startProducing(consumer)
    assert consumer.writes == []  # nothing in the caller's turn
    turns = 0
    while not done.called:
        clock.advance(0)
        assert len(clock.getDelayedCalls()) == 0  # paused: it waits for the consumer
        producer.resumeProducing()
        turns += 1
        assert turns < 10
    assert max(consumer.writes) <= CHUNK and consumer.value() == raw
    assert len(consumer.writes) == 4


def test_a_stopped_file_body_writes_no_more_and_never_fires():
    clock = Clock()
    producer = FileProducer(FileBody.of(io.BytesIO(b"x" * (2 * CHUNK))), clock)
    consumer = Pausing(producer)
    done = producer.startProducing(consumer)
    clock.advance(0)
    producer.stopProducing()
    producer.resumeProducing()
    clock.advance(0)
    assert len(consumer.value()) == CHUNK and not done.called
    assert clock.getDelayedCalls() == []


def test_a_file_body_goes_to_the_agent_as_a_file_producer():
    agent = RecordingAgent()
    body = FileBody.of(io.BytesIO(b"{}"))
    BridgeClient(agent, fallback=RecordingTreq(), clock=Clock()).request(
        "POST", "http://127.0.0.1:5102/v1/chat/completions", data=body, headers=None,
        allow_redirects=False, unbuffered=True)
    [(_, _, _, producer)] = agent.calls
    assert isinstance(producer, FileProducer) and producer.body is body
