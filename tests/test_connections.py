"""The header deadline and the connection cap, in memory: a Clock and StringTransports."""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from lmarena_gateway.connections import connections_for_open_files
from lmarena_gateway.site import GatewaySite

ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


class Held(Resource):
    """Answers /quick at once; /held never, so its connection stays busy serving."""

    isLeaf = True

    def render(self, request):
        if request.path == b"/held":
            return NOT_DONE_YET
        return b"ok"


def site(**limits) -> tuple[GatewaySite, Clock]:
    clock = Clock()
    gateway_site = GatewaySite(Held(), reactor=clock)
    for name, value in limits.items():
        setattr(gateway_site, name, value)
    return gateway_site, clock


def connect(gateway_site):
    protocol = gateway_site.buildProtocol(ADDRESS)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def envelope(transport) -> tuple[int, dict]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def test_headers_past_the_deadline_get_408_and_the_connection_closes():
    gateway_site, clock = site(header_timeout=5.0)
    protocol, transport = connect(gateway_site)
    protocol.dataReceived(b"GET /quick HTTP/1.1\r\n")
    for _ in range(4):  # one header line a second keeps twisted.web's idle timer happy
        clock.advance(1)
        protocol.dataReceived(b"X-Slow: 1\r\n")
    assert not transport.disconnecting
    clock.advance(1.01)
    status, body = envelope(transport)
    assert (status, body["error"]["code"]) == (408, "REQUEST_TIMEOUT")
    assert transport.disconnecting


def test_headers_in_time_are_served_and_the_next_request_gets_its_own_deadline():
    gateway_site, clock = site(header_timeout=5.0)
    protocol, transport = connect(gateway_site)
    protocol.dataReceived(b"GET /quick HTTP/1.1\r\nHost: x\r\n")
    clock.advance(4)
    protocol.dataReceived(b"\r\n")
    assert b"200 OK" in transport.value()
    clock.advance(30)  # an idle keep-alive connection has no header deadline (only the idle 60 s)
    assert not transport.disconnecting
    transport.clear()
    protocol.dataReceived(b"GET /quick HTTP/1.1\r\n")
    clock.advance(5.01)
    assert b"408" in transport.value()


def test_a_slow_answer_is_not_a_slow_request():
    gateway_site, clock = site(header_timeout=5.0)
    protocol, transport = connect(gateway_site)
    protocol.dataReceived(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(600)
    assert not transport.disconnecting and b"408" not in transport.value()


def test_past_the_cap_the_oldest_idle_or_slow_connection_makes_room():
    gateway_site, clock = site(max_connections=2)
    serving, serving_transport = connect(gateway_site)
    serving.dataReceived(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
    slow, slow_transport = connect(gateway_site)
    slow.dataReceived(b"GET /quick HTTP/1.1\r\n")
    newcomer, newcomer_transport = connect(gateway_site)
    assert slow_transport.disconnected  # evicted: it was only sending headers
    assert not serving_transport.disconnected
    newcomer.dataReceived(b"GET /quick HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in newcomer_transport.value()
    assert gateway_site.evicted == 1


def test_past_the_cap_with_every_connection_serving_a_new_one_gets_503():
    gateway_site, clock = site(max_connections=2)
    for _ in range(2):
        protocol, _ = connect(gateway_site)
        protocol.dataReceived(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
    _, refused = connect(gateway_site)
    status, body = envelope(refused)
    assert (status, body["error"]["code"]) == (503, "SERVER_BUSY")
    assert b"Retry-After: 1" in refused.value()
    assert refused.disconnecting
    assert gateway_site.open_connections == 2


def test_closed_connections_free_their_place():
    gateway_site, clock = site(max_connections=1)
    protocol, transport = connect(gateway_site)
    protocol.dataReceived(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
    protocol.connectionLost(None)
    assert gateway_site.open_connections == 0


def test_the_default_cap_leaves_two_descriptors_a_connection():
    assert connections_for_open_files(1024) == (1024 - 64) // 2
    assert connections_for_open_files(65536) > 30000


# --- framing: what could be read two ways is refused, in the envelope ---


def cap_site(cap: int):
    gateway_site, clock = site()
    gateway_site.requestFactory = type("Capped", (gateway_site.requestFactory,), {"body_cap": cap})
    return gateway_site


def test_two_transfer_encoding_headers_are_refused():
    protocol, transport = connect(site()[0])
    protocol.dataReceived(b"POST /quick HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    status, body = envelope(transport)
    assert (status, body["error"]["code"]) == (400, "INVALID_HTTP")
    assert b"200 OK" not in transport.value() and transport.disconnecting


def test_a_declared_length_over_the_cap_is_refused_before_the_body():
    protocol, transport = connect(cap_site(1000))
    protocol.dataReceived(b"POST /quick HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n")
    status, body = envelope(transport)
    assert (status, body["error"]["code"]) == (413, "BODY_TOO_LARGE")
    assert transport.disconnecting


def test_a_chunked_body_stops_being_read_at_the_cap():
    protocol, transport = connect(cap_site(1000))
    protocol.dataReceived(b"POST /quick HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    protocol.dataReceived(b"400\r\n" + b"x" * 1024 + b"\r\n")  # 1 KiB: past the cap, not the end
    status, body = envelope(transport)
    assert (status, body["error"]["code"]) == (413, "BODY_TOO_LARGE")
    assert transport.disconnecting
    protocol.dataReceived(b"0\r\n\r\n")  # whatever still arrives is not answered again
    assert transport.value().count(b"HTTP/1.1 ") == 1


def test_a_malformed_header_line_gets_the_envelope():
    protocol, transport = connect(site()[0])
    protocol.dataReceived(b"GET /quick HTTP/1.1\r\nno colon here\r\n\r\n")
    status, body = envelope(transport)
    assert (status, body["error"]["code"]) == (400, "INVALID_HTTP")


# --- each route's own cap, said while the headers arrive ---


def test_a_declared_length_over_a_small_routes_cap_is_refused_before_the_body():
    protocol, transport = connect(site()[0])  # the site's cap: 20 MiB
    protocol.dataReceived(b"POST /session/register HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: %d\r\n\r\n" % (64 * 1024 + 1))
    status, body = envelope(transport)
    assert (status, body["error"]["code"]) == (413, "BODY_TOO_LARGE")
    assert str(64 * 1024) in body["error"]["message"]
    assert transport.disconnecting


def test_the_v1_routes_keep_the_sites_cap():
    protocol, transport = connect(site()[0])
    protocol.dataReceived(b"POST /v1//chat/completions/?x=1 HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: %d\r\n\r\n" % (1024 * 1024))
    assert transport.value() == b"" and not transport.disconnecting


def test_a_chunked_body_stops_at_its_routes_cap():
    protocol, transport = connect(site()[0])
    protocol.dataReceived(b"POST /session//register HTTP/1.1\r\nHost: x\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n")
    protocol.dataReceived(b"8000\r\n" + b"x" * 0x8000 + b"\r\n")  # 32 KiB: under the cap
    assert transport.value() == b""
    protocol.dataReceived(b"8001\r\n" + b"x" * 0x8001 + b"\r\n")  # one byte past 64 KiB
    status, body = envelope(transport)
    assert (status, body["error"]["code"]) == (413, "BODY_TOO_LARGE")
    assert transport.disconnecting


def test_route_caps():
    from lmarena_gateway.site import GatewayRequest

    capped = type("Capped", (GatewayRequest,), {"body_cap": 20 << 20})
    assert capped.cap_for(b"/v1/chat/completions") == 20 << 20
    assert capped.cap_for(b"/v1/responses?stream=1") == 20 << 20
    assert capped.cap_for(b"/session/register") == 64 << 10
    assert capped.cap_for(b"/session%2Fregister") == 64 << 10
    assert capped.cap_for(b"/tab/connect") == 8 << 20
    assert capped.cap_for(b"/tab/push/") == 4 << 20
    assert capped.cap_for(b"/anything/else") == 64 << 10
    small = type("Small", (GatewayRequest,), {"body_cap": 1 << 20})
    assert small.cap_for(b"/tab/connect") == 1 << 20  # never more than the site's cap
