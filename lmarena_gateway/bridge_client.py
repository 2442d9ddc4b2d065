"""The bridge hot path: treq's ``request()`` surface on the bare ``Agent`` treq wraps.

treq wraps every call in a ``CookieAgent`` with a fresh cookie jar, a
``ContentDecoderAgent`` (which asks for gzip), a ``FileBodyProducer`` run by a
cooperator, and parses and IDNA-encodes the URL with hyperlink before the ``Agent``
parses it again. A bridge sets no cookies and its streams must not be compressed, and
the gateway talks to one or a few URLs. Under chat at concurrency 50 py-spy put 24 % of
the gateway's CPU in ``treq.HTTPClient.request``, of which the ``Agent`` itself was 14 %
(bench/profile.py; docs/performance.rst has the figures).

So requests of the shape the proxy sends (bytes or no body, no redirects, unbuffered)
go straight to ``Agent.request``: the same ``IResponse`` and ``deliverBody`` streaming,
and the same connection pool. Anything else goes through treq, which remains the API.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from .bodies import CHUNK, FileBody


@implementer(IBodyProducer)
class BytesProducer:
    """A body already in memory, written at once: no cooperator task per request."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer) -> Deferred:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IBodyProducer)
class FileProducer:
    """A large client body forwarded from the file twisted.web received it into, 64 KiB
    a reactor turn while the connection takes it: never one 16 MiB bytes object, nor a
    16 MiB join in the transport's write buffer."""

    def __init__(self, body: FileBody, clock) -> None:
        self.body = body
        self.clock = clock
        self.length = body.size
        self._left = body.size
        self._paused = self._stopped = False
        self._call: Any = None
        self._consumer: Any = None
        self._done: Deferred = Deferred()

    def startProducing(self, consumer) -> Deferred:
        self._consumer = consumer
        try:
            self.body.file.seek(0)
        except (ValueError, OSError) as e:
            return fail(e)
        self._schedule()
        return self._done

    def _schedule(self) -> None:
        if self._call is None and not self._paused and not self._stopped:
            self._call = self.clock.callLater(0, self._pump)

    def _pump(self) -> None:
        self._call = None
        if self._paused or self._stopped:
            return
        try:
            chunk = self.body.file.read(min(CHUNK, self._left))
        except (ValueError, OSError) as e:  # closed: the client's request has ended
            self._stopped = True
            self._done.errback(e)
            return
        if not chunk:
            self._stopped = True
            self._done.errback(OSError(f"the body's file ended {self._left} bytes early"))
            return
        self._left -= len(chunk)
        self._consumer.write(chunk)  # may pause us, at once
        if self._left == 0:
            self._stopped = True
            self._done.callback(None)
        else:
            self._schedule()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        """The request is abandoned; the Deferred never fires (IBodyProducer's rule)."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class BridgeClient:
    """``treq.HTTPClient.request`` for the bridge requests, without treq's wrappers."""

    takes_files = True  # a bodies.FileBody is forwarded from its file (FileProducer)

    def __init__(self, agent, *, fallback=None, clock=None) -> None:
        self.agent = agent
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        if fallback is None:
            from treq.client import HTTPClient

            fallback = HTTPClient(agent)
        self.fallback = fallback  # treq over the same agent, for any other request

    def request(self, method: str, url: str, *, data=None, headers=None,
                allow_redirects: bool = True, unbuffered: bool = False, **kwargs) -> Deferred:
        if (kwargs or allow_redirects or not unbuffered
                or not isinstance(data, (bytes, FileBody, type(None)))
                or not isinstance(headers, (Headers, type(None)))
                or not url.isascii()):
            return self.fallback.request(method, url, data=data, headers=headers,
                                         allow_redirects=allow_redirects,
                                         unbuffered=unbuffered, **kwargs)
        producer: Any = None
        if isinstance(data, FileBody):
            producer = FileProducer(data, self.clock)
        elif data is not None:
            producer = BytesProducer(data)
        # The Agent copies the headers before it adds Host: ours are not changed.
        return self.agent.request(method.encode("ascii"), url.encode("ascii"), headers, producer)


@implementer(IAgentEndpointFactory)
class BridgeEndpoints:
    """One endpoint per bridge address, made once; an IP literal skips the resolver.

    Twisted's Agent makes a new ``HostnameEndpoint`` for every request, even one that a
    pooled connection serves, and each new connection then resolves "127.0.0.1" through
    ``getaddrinfo`` in the thread pool (11 % of the samples while 10 000 streams opened).
    HTTP to an IP address connects directly; names and https are what Agent does.
    """

    def __init__(self, reactor, *, connect_timeout: float | None, tls_policy,
                 limit: int = 256) -> None:
        self.reactor = reactor
        self.timeout: dict[str, Any] = {} if connect_timeout is None else {"timeout": connect_timeout}
        self.tls_policy = tls_policy
        self.limit = limit  # registered bridge URLs are few; never grow without bound
        self._known: dict[tuple, object] = {}

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._known.get(key)
        if endpoint is None:
            endpoint = self._make(uri)
            if len(self._known) >= self.limit:
                self._known.clear()
            self._known[key] = endpoint
        return endpoint

    def _make(self, uri):
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"the host of {uri.toBytes()!r} is not ASCII") from None
        if uri.scheme == b"http":
            if isIPAddress(host):
                return TCP4ClientEndpoint(self.reactor, host, uri.port, **self.timeout)
            if isIPv6Address(host):
                return TCP6ClientEndpoint(self.reactor, host, uri.port, **self.timeout)
            return HostnameEndpoint(self.reactor, host, uri.port, **self.timeout)
        if uri.scheme == b"https":
            inner: Any = HostnameEndpoint(self.reactor, host, uri.port, **self.timeout)
            return wrapClientTLS(self.tls_policy.creatorForNetloc(uri.host, uri.port), inner)
        raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
