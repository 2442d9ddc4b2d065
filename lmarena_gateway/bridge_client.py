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

from twisted.internet.defer import Deferred, succeed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
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
