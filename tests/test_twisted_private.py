"""Each private Twisted hook we rely on, pinned: an upgrade that moves one fails here,
loudly and by name, instead of silently undoing what the hook was for."""

from __future__ import annotations

import socket

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web import http
from twisted.web._newclient import _WrapperException
from twisted.web.client import HTTPConnectionPool, ResponseFailed, _HTTP11ClientFactory
from twisted.web.resource import Resource
from twisted.web.server import Site

from lmarena_gateway.bridge import make_http_client
from lmarena_gateway.config import GatewayConfig
from lmarena_gateway.connections import GatewayChannel
from lmarena_gateway.site import GatewaySite


def test_the_connection_pool_builds_its_connections_with_its_factory_attribute():
    """make_http_client swaps pool._factory for a quiet one (no log line per connection)."""
    assert HTTPConnectionPool(MemoryReactorClock())._factory is _HTTP11ClientFactory
    _, pool = make_http_client(MemoryReactorClock(), GatewayConfig())
    assert issubclass(pool._factory, _HTTP11ClientFactory)
    assert pool._factory.noisy is False


def test_the_http11_channel_sits_behind_the_generic_protocol_with_its_limits():
    """GatewaySite tightens maxHeaders/totalHeadersSize on the wrapped HTTP/1.1 channel."""
    plain = Site(Resource()).buildProtocol(None)
    assert isinstance(plain._channel, http.HTTPChannel)
    assert isinstance(http.HTTPChannel.maxHeaders, int)
    assert isinstance(http.HTTPChannel.totalHeadersSize, int)
    ours = GatewaySite(Resource()).buildProtocol(None)._channel
    assert ours.maxHeaders == GatewaySite.max_headers < http.HTTPChannel.maxHeaders
    assert ours.totalHeadersSize == GatewaySite.max_header_bytes


def test_response_failed_is_a_wrapper_exception_with_reasons():
    """proxy.py unwraps client failures through _WrapperException.reasons."""
    assert issubclass(ResponseFailed, _WrapperException)
    assert ResponseFailed(["why"]).reasons == ["why"]


def test_raise_synchronously_makes_a_busy_port_fail_privileged_start():
    """service.py sets _raiseSynchronously so 'address in use' exits at once, in one line."""
    from twisted.internet import reactor

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        service = StreamServerEndpointService(
            TCP4ServerEndpoint(reactor, port, interface="127.0.0.1"), Site(Resource()))
        service._raiseSynchronously = True
        with pytest.raises(CannotListenError):
            service.privilegedStartService()
    finally:
        busy.close()


def test_the_request_line_is_known_while_the_headers_arrive(monkeypatch):
    """Each route's body cap (connections.GatewayChannel._body_cap) reads twisted.web's
    private ``HTTPChannel._path`` while the headers arrive, before any of the body. If an
    upgrade renames it, the 64 KiB routes silently go back to reading up to --max-body:
    this says so instead."""
    seen = []
    real = GatewayChannel.headerReceived

    def watching(self, line):
        seen.append(getattr(self, "_path", "twisted.web no longer has HTTPChannel._path"))
        return real(self, line)

    monkeypatch.setattr(GatewayChannel, "headerReceived", watching)
    protocol = GatewaySite(Resource()).buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"POST /session/register?a=1 HTTP/1.1\r\nHost: h\r\n"
                          b"Content-Length: 100000\r\n\r\n")
    assert seen and set(seen) == {b"/session/register?a=1"}
    assert transport.value().startswith(b"HTTP/1.1 413 ")
