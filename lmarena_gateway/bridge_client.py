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
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer


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


class BridgeClient:
    """``treq.HTTPClient.request`` for the bridge requests, without treq's wrappers."""

    def __init__(self, agent, *, fallback=None) -> None:
        self.agent = agent
        if fallback is None:
            from treq.client import HTTPClient

            fallback = HTTPClient(agent)
        self.fallback = fallback  # treq over the same agent, for any other request

    def request(self, method: str, url: str, *, data=None, headers=None,
                allow_redirects: bool = True, unbuffered: bool = False, **kwargs) -> Deferred:
        if (kwargs or allow_redirects or not unbuffered
                or not isinstance(data, (bytes, type(None)))
                or not isinstance(headers, (Headers, type(None)))
                or not url.isascii()):
            return self.fallback.request(method, url, data=data, headers=headers,
                                         allow_redirects=allow_redirects,
                                         unbuffered=unbuffered, **kwargs)
        producer = BytesProducer(data) if data is not None else None
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
