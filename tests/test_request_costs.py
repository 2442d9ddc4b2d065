"""What the gateway leaves out of each request's work, pinned against Twisted upgrades."""

from __future__ import annotations

import twisted.web.http
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from lmarena_gateway.site import GatewaySite


class Seen(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list = []

    def render_POST(self, request):
        self.requests.append((request.args, request.content.read()))
        return b"ok"


def post(site, content_type: bytes, body: bytes) -> bytes:
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"POST /x?q=1 HTTP/1.1\r\nHost: h\r\nContent-Type: " + content_type
                          + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    return transport.value()


def test_post_bodies_are_not_parsed_as_forms(monkeypatch):
    """twisted.web ran the stdlib email parser on every POST's Content-Type; no route
    takes a form. Should an upgrade parse it some other way, this fails."""
    parsed = []
    monkeypatch.setattr(twisted.web.http, "_parseContentType",
                        lambda line: parsed.append(line) or b"application/x-www-form-urlencoded")
    resource = Seen()
    answer = post(GatewaySite(resource), b"application/x-www-form-urlencoded", b"a=b")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert resource.requests == [({b"q": [b"1"]}, b"a=b")]  # the query still parsed; the body is the route's
    assert parsed == []


def test_the_pin_above_can_fail(monkeypatch):
    """The same request through a plain Site does call the parser the pin watches."""
    from twisted.web.server import Site

    parsed = []
    monkeypatch.setattr(twisted.web.http, "_parseContentType",
                        lambda line: parsed.append(line) or b"text/plain")
    post(Site(Seen()), b"application/json", b"{}")
    assert parsed == [b"application/json"]

