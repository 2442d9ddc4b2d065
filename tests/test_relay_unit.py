"""The relay protocol in memory: a StringTransport for the bridge, a Clock for time.

The socket tests show the relay works end to end; these pin the byte-level rules that
are hard to provoke over a socket: where an event ends, when a keep-alive may go out,
and what a client sees when the bridge stops early.
"""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.test.requesthelper import DummyRequest

from lmarena_gateway.relay import Relay

IDLE, KEEPALIVE = 30.0, 5.0


class ClientRequest(DummyRequest):
    """DummyRequest plus the one call it lacks: aborting the client connection."""

    def __init__(self) -> None:
        super().__init__([b"v1", b"chat", b"completions"])
        self.dropped = False

        self.producer = None
        self.streaming = None

    def registerProducer(self, producer, streaming) -> None:
        # DummyRequest's own spins on resumeProducing until unregistered
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.producer = None

    @property
    def transport(self):
        return self  # the relay aborts the client's transport: this request stands in for it

    def abortConnection(self) -> None:
        self.dropped = True


def relay(*, sse: bool = True):
    request, clock, finished = ClientRequest(), Clock(), Deferred()
    protocol = Relay(request, clock, sse=sse, idle_timeout=IDLE, keepalive=KEEPALIVE,
                     upstream_url="http://bridge.test", finished=finished)
    bridge = StringTransport()
    protocol.makeConnection(bridge)
    return protocol, request, clock, bridge, finished


def body(request) -> bytes:
    return b"".join(request.written)


def events(request) -> list[str]:
    return [e for e in body(request).decode().split("\n\n") if e]


def error_code(event: str) -> str:
    assert event.startswith("data: "), event
    return json.loads(event[len("data: "):])["error"]["code"]


def test_each_chunk_is_written_as_it_arrives_even_mid_line():
    protocol, request, _, _, _ = relay()
    protocol.dataReceived(b'data: {"a"')
    assert request.written[-1] == b'data: {"a"'
    protocol.dataReceived(b': 1}\n\n')
    assert request.written[-1] == b': 1}\n\n'
    assert request.finished == 0


def test_the_bridge_connection_is_the_clients_producer():
    protocol, request, _, bridge, _ = relay()
    assert request.producer is bridge
    assert request.streaming is True
    protocol.dataReceived(b"data: [DONE]\n\n")
    protocol.connectionLost(Failure(ResponseDone()))
    assert request.producer is None  # unregistered before finish()


def test_done_split_across_two_chunks_ends_the_stream_cleanly():
    protocol, request, _, _, finished = relay()
    protocol.dataReceived(b"data: {}\n\ndata: [DO")
    protocol.dataReceived(b"NE]\n\n")
    protocol.connectionLost(Failure(ResponseDone()))
    assert body(request) == b"data: {}\n\ndata: [DONE]\n\n"
    assert request.finished == 1
    assert finished.called


def test_a_stream_closed_before_done_ends_with_an_error_event_and_done():
    protocol, request, _, _, finished = relay()
    protocol.dataReceived(b"data: {}\n\n")
    protocol.connectionLost(Failure(ResponseDone()))
    *_, error, done = events(request)
    assert error_code(error) == "BRIDGE_STREAM_LOST"
    assert done == "data: [DONE]"
    assert request.finished == 1 and finished.called


def test_an_error_mid_event_first_closes_the_broken_event():
    protocol, request, _, _, _ = relay()
    protocol.dataReceived(b'data: {"cut')
    protocol.connectionLost(Failure(ConnectionLost()))
    assert body(request).startswith(b'data: {"cut\n\ndata: {"error"')
    assert error_code(events(request)[1]) == "BRIDGE_STREAM_LOST"


def test_keepalive_goes_out_only_between_events():
    protocol, request, clock, _, _ = relay()
    protocol.dataReceived(b'data: {"half')
    clock.advance(KEEPALIVE)
    assert b"keep-alive" not in body(request)  # it would have cut the event in two
    protocol.dataReceived(b'"}\n\n')
    clock.advance(KEEPALIVE)
    assert body(request).endswith(b'"}\n\n: keep-alive\n\n')


def test_crlf_separated_events_count_as_between_events():
    protocol, request, clock, _, _ = relay()
    protocol.dataReceived(b"data: {}\r\n\r\n")
    clock.advance(KEEPALIVE)
    assert body(request).endswith(b"data: {}\r\n\r\n: keep-alive\n\n")


def test_data_from_the_bridge_postpones_the_keepalive():
    protocol, request, clock, _, _ = relay()
    clock.advance(KEEPALIVE - 1)
    protocol.dataReceived(b"data: {}\n\n")
    clock.advance(KEEPALIVE - 1)
    assert b"keep-alive" not in body(request)
    clock.advance(1)
    assert body(request).endswith(b": keep-alive\n\n")


def test_a_silent_bridge_times_out_with_an_error_event_and_is_dropped():
    protocol, request, clock, bridge, finished = relay()
    protocol.dataReceived(b"data: {}\n\n")
    clock.advance(IDLE)
    *_, error, done = events(request)
    assert error_code(error) == "BRIDGE_TIMEOUT"
    assert done == "data: [DONE]"
    assert bridge.producerState == "stopped"
    assert finished.called and request.finished == 1
    assert not clock.getDelayedCalls()  # no timer outlives the answer


def test_a_non_stream_body_cut_short_drops_the_client_instead_of_finishing():
    protocol, request, _, _, finished = relay(sse=False)
    protocol.dataReceived(b'{"id": "chatcmpl-1", "choi')
    protocol.connectionLost(Failure(ConnectionLost()))
    assert request.dropped
    assert request.finished == 0  # a clean end would make cut JSON look complete
    assert finished.called


def test_a_complete_non_stream_body_finishes():
    protocol, request, clock, _, _ = relay(sse=False)
    protocol.dataReceived(b'{"id": "chatcmpl-1"}')
    protocol.connectionLost(Failure(ResponseDone()))
    assert body(request) == b'{"id": "chatcmpl-1"}'
    assert request.finished == 1 and not request.dropped
    assert not clock.getDelayedCalls()


def test_stop_drops_the_bridge_and_writes_nothing_more():
    protocol, request, clock, bridge, finished = relay()
    protocol.dataReceived(b"data: {}\n\n")
    protocol.stop()
    protocol.dataReceived(b"data: late\n\n")
    protocol.connectionLost(Failure(ConnectionLost()))
    assert bridge.producerState == "stopped"
    assert b"late" not in body(request)
    assert finished.called
    assert not clock.getDelayedCalls()
