"""The HTTP edge: what every request passes before and after its route.

Request ids, CORS and preflights, the request log and metrics, the 413 short-circuit,
forgiving paths, and the Site/Request tuning (header limits, header deadline,
connection cap, body cap). The routes themselves are in :mod:`lmarena_gateway.gateway`.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from zope.interface import implementer

from .connections import ConnectionLimits, connections_for_open_files
from .errors import ApiError
from .security import is_admin_path
from .validation import HTTP_TOKEN, is_printable

if TYPE_CHECKING:
    from .gateway import Gateway

log = Logger()
MAX_SESSION_BODY = 64 * 1024  # every route's body cap but the ones below
# Routes that read more; the /v1 routes read up to --max-body. (tabchannel.py's limits.)
ROUTE_BODY_CAPS = {b"/tab/connect": 8 * 1024 * 1024, b"/tab/push": 4 * 1024 * 1024}
ALLOW_METHODS = b"GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = b"Content-Type, Authorization, X-Session-Name, X-Target-Domain, X-Request-ID"
_SLASHES = re.compile(rb"//+")


def allowed_request_headers(asked: bytes | None) -> bytes:
    """What a preflight may allow: the headers it asks for, if each is a token.

    The openai Node SDK sends x-stainless-* headers (and more with each release), so a
    fixed list drops its calls in every browser; echoing what is asked is the one list
    that keeps up. Anything that is not a header name gets the fixed list instead.
    """
    if not asked:
        return ALLOW_HEADERS
    names = [name.strip() for name in asked.split(b",") if name.strip()]
    if not names or len(names) > 64 or not all(HTTP_TOKEN.fullmatch(name) for name in names):
        return ALLOW_HEADERS
    return b", ".join(names)



def request_id(request) -> str:
    """The client's X-Request-ID when it is sane, else a new one (the front door sets it)."""
    if isinstance(request, GatewayRequest) and request.request_id:
        return request.request_id
    given = request.getHeader(b"x-request-id")
    if given:
        text = given.decode("latin-1")
        if is_printable(text, 1, 128):
            return text
    return uuid.uuid4().hex


@implementer(IResource)
class FrontDoor:
    """Wraps the Klein app: CORS on every response (streams too) and one log line per request."""

    isLeaf = True

    def __init__(self, inner, config, metrics=None, admin=None, activity=None) -> None:
        self.inner = inner
        self.config = config
        self.metrics = metrics
        self.admin = admin  # AdminAuth: admin paths answer CORS only as it allows
        self.activity = activity  # the status page's counts

    def getChildWithDefault(self, name, request):
        return self

    def putChild(self, path, child):
        raise NotImplementedError()

    def _allow_origin(self, request) -> bytes | None:
        """/session/register answers the LMArena pages (and extras); the rest --cors-origins.

        The status page never: no other page may read it (it holds the CSRF token).
        """
        if request.path.startswith(b"/status"):
            return None
        if request.path == b"/session/register":
            origins = registration_origins(self.config)
        elif is_admin_path(request.method, request.path):
            request.setHeader(b"Vary", b"Origin")
            allowed = self.admin is not None and self.admin.cors_allowed(request)
            return request.getHeader(b"origin") if allowed else None
        else:
            origins = self.config.cors_origins
            if "*" in origins:
                return b"*"
        # The answer depends on Origin whether or not it matches: a cache must not hand
        # one origin's answer (with or without the header) to another.
        request.setHeader(b"Vary", b"Origin")
        origin = request.getHeader(b"origin")
        if origin and origin.decode("latin-1") in origins:
            return origin
        return None

    @staticmethod
    def _forgiving_path(request) -> None:
        """``/v1//chat/completions`` (a base URL ending in /) is served, never redirected.

        werkzeug would answer a 308 to our own port, past the front proxy and over http.
        """
        path = request.path
        if b"//" not in path and not (path.endswith(b"/") and len(path) > 1):
            return
        request.path = _SLASHES.sub(b"/", path).rstrip(b"/") or b"/"
        request.postpath = [segment for segment in request.postpath if segment]

    def render(self, request):
        started = time.monotonic()
        self._forgiving_path(request)
        request.request_id = request_id(request)  # GatewayRequest declares it
        request.setHeader(b"X-Request-ID", request.request_id.encode())
        origin = self._allow_origin(request)
        if origin:
            request.setHeader(b"Access-Control-Allow-Origin", origin)
            request.setHeader(b"Access-Control-Expose-Headers", b"X-Request-ID")
        if self.config.log_requests:
            request.notifyFinish().addBoth(self._log, request, started)
        if self.metrics is not None:
            request.notifyFinish().addBoth(
                lambda _: self.metrics.request_done(request, time.monotonic() - started))
        if self.activity is not None:
            self.activity.started(request)
            request.notifyFinish().addBoth(
                lambda result: self.activity.finished(request, result is not None))
        if getattr(request, "too_large", False):
            request.setResponseCode(413)
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Connection", b"close")
            return ApiError(413, "BODY_TOO_LARGE", "the request body is too large").body()
        if request.method == b"OPTIONS":
            request.setResponseCode(204)
            request.setHeader(b"Access-Control-Allow-Methods", ALLOW_METHODS)
            asked = request.getHeader(b"access-control-request-headers")
            request.setHeader(b"Access-Control-Allow-Headers",
                              allowed_request_headers(asked) if origin else ALLOW_HEADERS)
            vary = request.responseHeaders.getRawHeaders(b"vary", [])
            request.setHeader(b"Vary", b", ".join([*vary, b"Access-Control-Request-Headers"]))
            request.setHeader(b"Access-Control-Max-Age", b"600")
            return b""
        return self.inner.render(request)

    def _log(self, result, request, started):
        v1 = request.path.startswith(b"/v1/")
        session = request.getHeader(b"x-session-name") or (b"default" if v1 else b"-")
        domain = request.getHeader(b"x-target-domain") or (b"lmarena.ai" if v1 else b"-")
        log.info(
            "{method} {path} {status} {bytes}B {ms:.1f}ms session={session} domain={domain}",
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            # a client that left before the end is logged as nginx does: 499
            status=request.code if result is None else 499,
            bytes=request.sentLength,
            ms=(time.monotonic() - started) * 1000,
            session=session.decode("latin-1")[:64],
            domain=domain.decode("latin-1")[:64],
            request_id=request.request_id,
            disconnected=result is not None,
        )


def registration_origins(config) -> frozenset[str]:
    extras = {o for o in config.cors_origins if o != "*"}
    return frozenset({f"https://{d}" for d in config.domains} | extras)


class GatewayRequest(Request):
    """Carries the request id the front door gives it, and stops storing a body past the
    largest any route accepts, however it is sent."""

    request_id = ""  # set by FrontDoor.render, read by the log, the relay and the proxy
    body_cap = 20 * 1024 * 1024  # the site's; the channel sets each request's own (cap_for)
    too_large = False
    _received = 0

    @classmethod
    def cap_for(cls, target: bytes) -> int:
        """The most body the route of ``target`` (the request line's) reads; never more
        than the site's cap. Said while the headers arrive, so a /session/register body
        is refused at 64 KiB, not at --max-body."""
        path = unquote_to_bytes(target.split(b"?", 1)[0])
        path = _SLASHES.sub(b"/", path).rstrip(b"/") or b"/"  # as FrontDoor forgives it
        if path.startswith(b"/v1/"):
            return cls.body_cap
        return min(ROUTE_BODY_CAPS.get(path, MAX_SESSION_BODY), cls.body_cap)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.body_cap:
            if not self.too_large:
                self.too_large = True
                refuse = getattr(self.channel, "body_too_large", None)
                if refuse is not None:
                    refuse(self.body_cap)  # 413 at once; nothing more of the body is read
            return
        super().handleContentChunk(data)


class GatewaySite(ConnectionLimits, Site):  # type: ignore[misc]  # protocol: see connections
    """Our own request log replaces twisted.web's access log; tighter header limits,
    a header deadline and a connection cap (see :mod:`lmarena_gateway.connections`)."""

    requestFactory = GatewayRequest
    max_headers = 100
    max_header_bytes = 16 * 1024

    def __init__(self, resource, **kwargs) -> None:
        # No route takes a form post, and twisted.web would otherwise run the stdlib
        # email parser on every POST's Content-Type to find one: 10 % of the CPU of
        # chat at concurrency 50 (bench/profile.py).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        Site.__init__(self, resource, **kwargs)
        ConnectionLimits.__init__(self)

    def log(self, request) -> None:
        pass

    def buildProtocol(self, addr):
        refusal = self.make_room()
        if refusal is not None:
            return refusal
        protocol = super().buildProtocol(addr)
        # twisted.web wraps the HTTP/1.1 channel to negotiate HTTP/2; the limits live inside.
        channel = getattr(protocol, "_channel", protocol)
        channel.maxHeaders = self.max_headers
        channel.totalHeadersSize = self.max_header_bytes
        return protocol


def make_site(gateway: Gateway) -> GatewaySite:
    """The Site a listener serves: the routes behind the front door, with the limits."""
    site = GatewaySite(FrontDoor(gateway.app.resource(), gateway.config, gateway.metrics,
                                 admin=gateway.admin, activity=gateway.status.activity))
    site.requestFactory = type("Request", (GatewayRequest,), {  # type: ignore[assignment]
        "body_cap": max(gateway.config.max_body, MAX_SESSION_BODY)})
    site.displayTracebacks = False
    site.header_timeout = gateway.config.header_timeout
    site.max_connections = gateway.config.max_connections or connections_for_open_files(
        _open_files_limit())
    return site


def _open_files_limit() -> int:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft
