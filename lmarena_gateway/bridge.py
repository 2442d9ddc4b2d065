"""Everything about talking to a bridge, apart from relaying its answer.

The client and its connection pool (the hot path itself is in
:mod:`lmarena_gateway.bridge_client`), where a session's requests go
(:class:`Upstream`), how the HTTP client's failures read, and the bridge's error
dialect turned into the OpenAI envelope, with our secrets cut out.
"""

from __future__ import annotations

import json
from typing import Any

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web._newclient import _WrapperException
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from .bridge_client import BridgeClient, BridgeEndpoints
from .config import GatewayConfig
from .errors import envelope
from .security import require_bridge_allowed
from .sessions import SessionRecord

MAX_ERROR_BODY = 64 * 1024


def reasons(failure):
    """The failure and every failure the HTTP client wrapped inside it."""
    yield failure
    if failure.check(_WrapperException):
        for reason in failure.value.reasons:
            yield from reasons(reason)


def cancelled(failure) -> bool:
    """A cancellation, however the HTTP client wrapped it."""
    return any(f.check(CancelledError, ConnectingCancelledError) for f in reasons(failure))


def tls_failed(failure) -> bool:
    from OpenSSL.SSL import Error as TLSError

    return any(f.check(TLSError) for f in reasons(failure))


def why(failure) -> str:
    """One readable reason, not a repr of nested Failures."""
    if failure.check(_WrapperException) and failure.value.reasons:
        return why(failure.value.reasons[0])
    return failure.getErrorMessage() or failure.type.__name__


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False  # one "Starting factory" log line per bridge connection is noise


@implementer(IPolicyForHTTPS)
class HandshakeDeadline:
    """TLS to a bridge must finish within the connect timeout.

    A plain-http server sent a TLS ClientHello may wait for a request line forever
    (twisted.web does), so an ``https://`` URL in front of it would hang until the idle
    timeout; past the deadline the handshake fails as a TLS error, which we can name.
    """

    def __init__(self, inner, clock, timeout: float) -> None:
        self.inner = inner
        self.clock = clock
        self.timeout = timeout

    def creatorForNetloc(self, hostname: bytes, port: int):
        return _DeadlineCreator(self.inner.creatorForNetloc(hostname, port), self)


@implementer(IOpenSSLClientConnectionCreator)
class _DeadlineCreator:
    def __init__(self, inner, policy: HandshakeDeadline) -> None:
        self.inner = inner
        self.policy = policy

    def clientConnectionForTLS(self, tls_protocol):
        from OpenSSL.SSL import Error as TLSError

        connection = self.inner.clientConnectionForTLS(tls_protocol)

        def expired() -> None:
            # A finished handshake or a closed connection makes this a no-op.
            if tls_protocol.connected and not getattr(tls_protocol, "_handshakeDone", True):
                tls_protocol.failVerification(Failure(TLSError(
                    f"no TLS handshake within {self.policy.timeout:g} s")))

        self.policy.clock.callLater(self.policy.timeout, expired)
        return connection


def make_http_client(reactor, config: GatewayConfig):
    """One client over one persistent pool for every bridge request.

    treq's surface; the bridge requests skip treq's per-call wrappers (see bridge_client).
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietClientFactory
    pool.maxPersistentPerHost = 64
    # Below uvicorn's 5 s keep-alive: we drop idle connections before the bridge does,
    # so a POST never lands on a connection the bridge is closing.
    pool.cachedConnectionTimeout = 4
    tls = HandshakeDeadline(BrowserLikePolicyForHTTPS(), reactor, config.connect_timeout)
    endpoints = BridgeEndpoints(reactor, connect_timeout=config.connect_timeout, tls_policy=tls)
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    return BridgeClient(agent, clock=reactor), pool


@frozen
class Upstream:
    """Where one request goes and how it authenticates there.

    ``label`` names it in messages a client shows its user: the session, never the URL
    (which stays in the log line, matched by the request id).
    """

    base_url: str
    api_key: str | None = None
    label: str = "the bridge"

    def url(self, path: str) -> str:
        return self.base_url + path


def upstream_for(record: SessionRecord | None, config: GatewayConfig) -> Upstream:
    """The operator's key goes only to the operator's bridge, never to a registered URL.

    A registered URL is checked against --bridge-allow again here: the list may have
    shrunk since the session was registered.
    """
    label = f"the bridge of session {record.session_name!r}" if record is not None \
        else "the default bridge"
    if record is not None and record.bridge_base_url:
        require_bridge_allowed(record.bridge_base_url, config.bridge_allow_list, status=403)
        return Upstream(record.bridge_base_url, record.bridge_api_key, label)
    key = record.bridge_api_key if record is not None and record.bridge_api_key else config.bridge_api_key
    return Upstream(config.bridge_url, key, label)


BRIDGE_CODES = {
    400: "BRIDGE_BAD_REQUEST",
    401: "BRIDGE_UNAUTHORIZED",
    403: "BRIDGE_FORBIDDEN",
    404: "BRIDGE_NOT_FOUND",
    413: "BRIDGE_PAYLOAD_TOO_LARGE",
    429: "BRIDGE_RATE_LIMITED",
    503: "BRIDGE_NOT_READY",
}


def normalize_error(status: int, body: bytes) -> dict:
    """The bridge's three error shapes ({"detail"}, {"error": str}, the envelope) as the envelope."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    code = BRIDGE_CODES.get(status, "BRIDGE_ERROR")
    kind = "invalid_request_error" if status < 500 else "bridge_error"
    message = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            message = error.get("message")
            code = str(error.get("code") or code)
            kind = str(error.get("type") or kind)
        elif isinstance(error, str):
            message = error
        elif "detail" in data:
            detail = data["detail"]
            message = detail if isinstance(detail, str) else json.dumps(detail)
    if not isinstance(message, str) or not message:
        text = body.decode("utf-8", "replace").strip()[:500]
        message = text or f"the bridge answered HTTP {status}"
    return envelope(f"bridge: {message}", code, kind)


REDACTED = "[redacted]"


def redact(payload: dict, secrets) -> dict:
    """The envelope with every secret we hold cut out of its strings.

    A bridge may echo what it was sent (``Authorization: Bearer <bridge key>``) in an
    error; that text must not reach the client, the metrics or the log.
    """
    secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def clean(value):
        if not isinstance(value, str):
            return value
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value

    return {"error": {key: clean(value) for key, value in payload["error"].items()}}


class Capped(Protocol):
    """Collects a body up to ``limit`` bytes, then drops the rest of it."""

    transport: Any

    def __init__(self, limit: int, done: Deferred) -> None:
        self.limit = limit
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.size >= self.limit:
            return
        self.parts.append(data[: self.limit - self.size])
        self.size += len(self.parts[-1])
        if self.size >= self.limit:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(b"".join(self.parts))


def read_capped(response, limit: int = MAX_ERROR_BODY) -> Deferred:
    """The first ``limit`` bytes of a body: an error page may be as large as it likes."""
    done: Deferred = Deferred()
    response.deliverBody(Capped(limit, done))
    return done
