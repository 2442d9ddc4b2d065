"""What one slow client may hold: a header deadline, and a cap on open connections.

twisted.web resets its idle timer on every byte, so a client sending one byte a second
keeps a connection (a descriptor) forever, and enough of them exhaust the process's
descriptors. Here a request's headers must be complete ``header_timeout`` seconds after
its first byte, and past ``max_connections`` the oldest connection that is not serving
a request (idle, or still sending headers) makes room for the new one; only when every
connection is busy serving is a new one refused, with a 503 in the envelope.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol

from .errors import ApiError

log = Logger()
FD_RESERVE = 64  # listeners, the store, logs, the resolver: descriptors that are not clients


def _raw_response(status: bytes, error: ApiError, extra: bytes = b"") -> bytes:
    body = error.body()
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n"
            + extra + b"\r\n" + body)


def connections_for_open_files(soft_limit: int) -> int:
    """Each connection serving a chat holds two descriptors: its own and the bridge's."""
    return max(16, (soft_limit - FD_RESERVE) // 2)


class GatewayChannel(HTTPChannel):
    """An HTTP/1.1 channel whose request headers have a deadline."""

    transport: Any
    header_timeout = 10.0
    _deadline = None
    _serving = False  # between a request's last header and the end of its answer

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connection_opened(self)

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None and not self._serving and data:
            self._deadline = self.callLater(self.header_timeout, self._headers_too_slow)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._serving = True
        self._cancel_deadline()
        cap = self._body_cap()
        if cap is not None and self.requests:
            self.requests[-1].body_cap = cap  # a chunked body stops at its route's cap
        super().allHeadersReceived()

    def _body_cap(self) -> int | None:
        """The current request's route's cap, from its request line.

        twisted.web keeps the request line's target in the private ``_path`` until the
        body has arrived, and gives it to the Request only then; tests/test_twisted_private.py
        fails loudly if an upgrade moves it. Without it, the site's cap applies.
        """
        factory = self.requestFactory
        target = getattr(self, "_path", None)
        if target is not None and hasattr(factory, "cap_for"):
            return factory.cap_for(target)
        return getattr(factory, "body_cap", None)

    def requestDone(self, request) -> None:
        super().requestDone(request)
        self._serving = bool(self.requests)

    # --- framing: refuse what could be read two ways, answer in the envelope ---

    def _maybeChooseTransferDecoder(self, header, data):
        request = self.requests[-1]
        if header == b"Transfer-Encoding" and request.requestHeaders.hasHeader(header):
            # Two of them may be read two ways by two servers: request smuggling.
            self._refuse(b"400 Bad Request", "INVALID_HTTP",
                         "the request has more than one Transfer-Encoding header")
            return False
        if header == b"Content-Length" and data.isdigit():
            cap = self._body_cap()
            if cap is not None and int(data) > cap:
                self.body_too_large(cap)  # said up front: not one byte of the body is read
                return False
        return super()._maybeChooseTransferDecoder(header, data)

    def allContentReceived(self) -> None:
        if getattr(self, "_refused", False):
            return  # already answered: the route must not answer a second time
        super().allContentReceived()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """twisted.web's framing errors (bad header lines, chunk sizes): in the envelope."""
        self._refuse(b"400 Bad Request", "INVALID_HTTP",
                     "the request is not well-formed HTTP/1.1")

    def body_too_large(self, cap: int) -> None:
        """Stop reading at the cap: answer 413 now and close, instead of reading on."""
        self._refuse(b"413 Request Entity Too Large", "BODY_TOO_LARGE",
                     f"the request body is over {cap} bytes")

    def _refuse(self, status: bytes, code: str, message: str) -> None:
        if getattr(self, "_refused", False):
            return
        self._refused = True
        self._cancel_deadline()
        self.transport.write(_raw_response(status, ApiError(int(status[:3]), code, message)))
        self.loseConnection()

    @property
    def evictable(self) -> bool:
        return not self._serving

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        log.info("request headers not complete {timeout:g} s after their first byte: "
                 "connection closed", timeout=self.header_timeout)
        self.transport.write(_raw_response(b"408 Request Timeout", ApiError(
            408, "REQUEST_TIMEOUT",
            f"the request headers took longer than {self.header_timeout:g} s")))
        self.transport.loseConnection()

    def evict(self) -> None:
        """Make room for a new connection: close this idle or slow one at once."""
        self._cancel_deadline()
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        self.factory.connection_closed(self)
        super().connectionLost(reason)


class _Busy(Protocol):
    """Every connection is serving a request: say so, and hang up."""

    transport: Any

    def connectionMade(self) -> None:
        self.transport.write(_raw_response(b"503 Service Unavailable", ApiError(
            503, "SERVER_BUSY", "the gateway is serving as many connections as it may "
            "(--max-connections); retry shortly", "server_error"), b"Retry-After: 1\r\n"))
        self.transport.loseConnection()


class ConnectionLimits:
    """Mixed into the Site: counts its connections and keeps them under the cap."""

    max_connections = 1000
    header_timeout = 10.0

    def __init__(self) -> None:
        self._open: OrderedDict = OrderedDict()  # oldest first
        self.refused = 0
        self.evicted = 0

    def protocol(self):  # Factory.protocol is a class; this builds a channel instead
        channel = GatewayChannel()
        channel.header_timeout = self.header_timeout
        return _GenericHTTPChannelProtocol(channel)

    def make_room(self):
        """None when a connection may be accepted, else the protocol that refuses it."""
        if len(self._open) < self.max_connections:
            return None
        for channel in self._open:
            if channel.evictable:
                del self._open[channel]
                self.evicted += 1
                channel.evict()
                return None
        self.refused += 1
        if self.refused == 1 or self.refused % 1000 == 0:
            log.warn("{count} connections refused: all {cap} are serving requests "
                     "(--max-connections)", count=self.refused, cap=self.max_connections)
        return _Busy()

    def connection_opened(self, channel) -> None:
        self._open[channel] = None

    def connection_closed(self, channel) -> None:
        self._open.pop(channel, None)

    @property
    def open_connections(self) -> int:
        return len(self._open)
