"""The HTTP face of the gateway: Klein routes, CORS, error envelopes, request logs."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from urllib.parse import unquote

from klein import Klein
from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Site
from werkzeug.exceptions import MethodNotAllowed, NotFound
from zope.interface import implementer

from . import __version__
from .errors import ApiError, render_error, write_json
from .proxy import Proxy
from .sessions import check_domain, check_session_name, validate_registration

log = Logger()
MAX_SESSION_BODY = 64 * 1024
ALLOW_METHODS = b"GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = b"Content-Type, Authorization, X-Session-Name, X-Target-Domain, X-Request-ID"


class Gateway:
    """Routes are methods; everything they need was handed in."""

    app = Klein()

    def __init__(self, config, store, client, clock) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.proxy = Proxy(config, store, client, clock)

    # --- errors: everything in the OpenAI envelope ---

    @app.handle_errors(ApiError)
    def _api_error(self, request, failure):
        return render_error(request, failure.value)

    @app.handle_errors(NotFound)
    def _not_found(self, request, failure):
        path = request.path.decode("latin-1")
        return render_error(request, ApiError(404, "NOT_FOUND", f"no such endpoint: {path}"))

    @app.handle_errors(MethodNotAllowed)
    def _wrong_method(self, request, failure):
        allowed = sorted(set(failure.value.valid_methods or ()) | {"OPTIONS"})
        request.setHeader(b"Allow", ", ".join(allowed).encode())
        method = request.method.decode("latin-1")
        return render_error(request, ApiError(
            405, "METHOD_NOT_ALLOWED", f"{method} is not allowed here; use {', '.join(allowed)}"))

    # --- health ---

    @app.route("/health", methods=["GET"])
    def health(self, request):
        now = datetime.fromtimestamp(self.clock.seconds(), timezone.utc)
        store = self.store.health()
        status = "ok" if store.get("status") == "ok" else "degraded"
        return write_json(request, 200, {
            "status": status,
            "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "version": __version__,
            "store": store,
        })

    # --- sessions ---

    def _json_body(self, request, limit: int):
        raw = request.content.read(limit + 1)
        if len(raw) > limit:
            raise ApiError(413, "BODY_TOO_LARGE", f"the body is over {limit} bytes")
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(400, "INVALID_JSON", "the body is not valid JSON") from None

    @app.route("/session/register", methods=["POST"])
    @inlineCallbacks
    def register(self, request):
        registration = validate_registration(
            self._json_body(request, MAX_SESSION_BODY), self.config.domains)
        record = yield self.store.register(registration, self.clock.seconds())
        log.info("session registered: {domain}/{name}", domain=record.domain, name=record.session_name)
        return write_json(request, 200, {"status": "ok", "domain": record.domain,
                                         "session_name": record.session_name})

    @app.route("/session/list", methods=["GET"])
    def list_sessions(self, request):
        wanted = request.args.get(b"domain", [b""])[0].decode("utf-8", "replace")
        domain = check_domain(wanted, self.config.domains) if wanted else None
        listing: dict[str, dict] = {d: {} for d in ([domain] if domain else self.config.domains)}
        for record in sorted(self.store.records(domain), key=lambda r: r.key):
            listing.setdefault(record.domain, {})[record.session_name] = record.public()
        return write_json(request, 200, {"domains": listing})

    @app.route("/session/<path:rest>", methods=["DELETE"])
    @inlineCallbacks
    def delete_session(self, request, rest):
        # Klein has decoded the path once already; split on the raw path so an encoded
        # "/" inside a segment stays part of that segment and then fails validation.
        raw = request.path.decode("latin-1").split("/")[2:]
        if len(raw) != 2:
            raise ApiError(404, "NOT_FOUND", "use DELETE /session/{domain}/{session_name}")
        domain = check_domain(unquote(raw[0]), self.config.domains)
        name = check_session_name(unquote(raw[1]))
        existed = yield self.store.delete(domain, name)
        if not existed:
            raise ApiError(404, "SESSION_NOT_FOUND", f"no session {name!r} for domain {domain!r}")
        log.info("session deleted: {domain}/{name}", domain=domain, name=name)
        return write_json(request, 200, {"status": "deleted", "domain": domain, "session_name": name})

    # --- the registration userscript (issue 5 fills this in) ---

    @app.route("/userscript/generate", methods=["GET"])
    def userscript(self, request):
        from .userscript import serve

        return serve(request, self.config)

    # --- the OpenAI-compatible API ---

    @app.route("/v1/chat/completions", methods=["POST"])
    def chat_completions(self, request):
        return self.proxy.chat(request)

    @app.route("/v1/images/generations", methods=["POST"])
    def image_generations(self, request):
        return self.proxy.images(request)

    @app.route("/v1/models", methods=["GET"])
    def models(self, request):
        return self.proxy.models(request)


@implementer(IResource)
class FrontDoor:
    """Wraps the Klein app: CORS on every response (streams too) and one log line per request."""

    isLeaf = True

    def __init__(self, inner, config) -> None:
        self.inner = inner
        self.config = config

    def getChildWithDefault(self, name, request):
        return self

    def putChild(self, path, child):
        raise NotImplementedError()

    def _allow_origin(self, request) -> bytes | None:
        origins = self.config.cors_origins
        if "*" in origins:
            return b"*"
        origin = request.getHeader(b"origin")
        if origin and origin.decode("latin-1") in origins:
            request.setHeader(b"Vary", b"Origin")
            return origin
        return None

    def render(self, request):
        started = time.monotonic()
        origin = self._allow_origin(request)
        if origin:
            request.setHeader(b"Access-Control-Allow-Origin", origin)
            request.setHeader(b"Access-Control-Expose-Headers", b"X-Request-ID")
        if self.config.log_requests:
            request.notifyFinish().addBoth(self._log, request, started)
        if request.method == b"OPTIONS":
            request.setResponseCode(204)
            request.setHeader(b"Access-Control-Allow-Methods", ALLOW_METHODS)
            request.setHeader(b"Access-Control-Allow-Headers", ALLOW_HEADERS)
            request.setHeader(b"Access-Control-Max-Age", b"600")
            return b""
        return self.inner.render(request)

    def _log(self, result, request, started):
        log.info(
            "{method} {path} {status} {bytes}B {ms:.1f}ms session={session} domain={domain}",
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            status=request.code,
            bytes=request.sentLength,
            ms=(time.monotonic() - started) * 1000,
            session=(request.getHeader(b"x-session-name") or b"-").decode("latin-1")[:64],
            domain=(request.getHeader(b"x-target-domain") or b"-").decode("latin-1")[:64],
            disconnected=result is not None,
        )


class GatewaySite(Site):
    """Our own request log replaces twisted.web's access log."""

    def log(self, request) -> None:
        pass


def make_site(gateway: Gateway) -> GatewaySite:
    site = GatewaySite(FrontDoor(gateway.app.resource(), gateway.config))
    site.displayTracebacks = False
    return site
