"""The gateway's routes: Klein handlers and their error envelopes (the edge is in site)."""

from __future__ import annotations

from datetime import datetime, timezone
from urllib.parse import unquote

from attrs import evolve
from klein import Klein
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.logger import Logger
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import PathConverter

from . import __version__
from .bodies import Bodies
from .errors import ApiError, render_error, write_json
from .metrics import Metrics
from .proxy import Proxy
from .security import AdminAuth, ClientKeys, require_bridge_allowed
from .sessions import check_domain, check_session_name, check_session_room, trimmed, validate_registration
from .site import MAX_SESSION_BODY, registration_origins, request_id
from .status import StatusPages
from .tabchannel import TabChannel
from .workers import tab_mode_off

log = Logger()
class _DomainAndName(PathConverter):
    """At least two segments, so /session/register and /session/list are not DELETE targets
    (their 405 then names only their own methods in Allow)."""

    regex = "[^/]+/.+"


class Gateway:
    """Routes are methods; everything they need was handed in."""

    app = Klein()
    app.url_map.converters["domain_and_name"] = _DomainAndName
    app.url_map.merge_slashes = False  # FrontDoor collapses them; werkzeug would redirect

    def __init__(self, config, store, client, clock, *, tokens=None, client_keys=None,
                 metrics=None, tabs=None, status=None, bodies=None, worker=None) -> None:
        self.config = config
        self.bodies = bodies if bodies is not None else Bodies()  # the parse pool's front
        self.worker = worker  # a WorkerRole with --workers > 1: /health names the process
        self.store = store
        self.clock = clock
        self.metrics = metrics if metrics is not None else Metrics(store, config.domains)
        self.admin = AdminAuth(config.admin_token, public_url=config.public_url,
                               cors_origins=config.cors_origins)
        self.tokens = tokens  # RegistrationTokens, or None: only admins register
        self.tabs = tabs  # the TabRegistry, or None: no tab mode (some unit tests)
        self.proxy = Proxy(config, store, client, clock,
                           client_keys=client_keys or (lambda: ClientKeys({})),
                           metrics=self.metrics, tabs=tabs, bodies=self.bodies)
        self.tab_channel = TabChannel(config, store, tokens, tabs, clock,
                                      check_origin=self._require_allowed_origin,
                                      bodies=self.bodies)
        # The operator's page; make_service hands in one with the probe and the pruner.
        self.status = status if status is not None else StatusPages.build(
            config, store, clock, tokens=tokens)

    def _require_admin(self, request, *, allow_basic: bool = False) -> None:
        self.admin.require(request, allow_basic=allow_basic)

    def _require_allowed_origin(self, request) -> None:
        """Browsers may change sessions only from the LMArena pages (and listed extras).

        Without this, any web page a user opens could post to a gateway on their machine.
        Extension origins (the userscript manager's own requests) cannot be forged by pages.
        """
        origin = request.getHeader(b"origin")
        if origin is None:
            return
        text = origin.decode("latin-1")
        if text.startswith(("chrome-extension://", "moz-extension://", "safari-web-extension://")):
            return
        if text not in registration_origins(self.config):
            raise ApiError(403, "ORIGIN_NOT_ALLOWED",
                           f"requests from {text} may not change sessions")

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

    @app.handle_errors(Exception)
    def _unexpected(self, request, failure):
        """Last: a bug is logged once and answered in the envelope, never Twisted's HTML page."""
        log.failure("unexpected error in {method} {path}", failure,
                    method=request.method.decode("latin-1"), path=request.path.decode("latin-1"),
                    request_id=request_id(request))
        return render_error(request, ApiError(500, "INTERNAL_ERROR",
                                              "the gateway failed on this request; its log says why",
                                              "server_error"))

    # --- health ---

    @app.route("/health", methods=["GET"])
    def health(self, request):
        now = datetime.fromtimestamp(self.clock.seconds(), timezone.utc)
        store = self.store.health()
        status = "ok" if store.get("status") == "ok" else "degraded"
        health = {
            "status": status,
            "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "version": __version__,
            "store": store,
        }
        if self.tabs is not None:
            health["tabs"] = self.tabs.per_domain(self.config.domains)
            # per session: its tabs (connected since, busy, last error), busy count, queue
            health["tab_sessions"] = self.tabs.snapshot()
        if self.worker is not None:
            health["worker"] = self.worker.health()
        return write_json(request, 200, health)

    # --- sessions ---

    def _json_body(self, request, limit: int):
        raw = request.content.read(limit + 1)
        if len(raw) > limit:
            raise ApiError(413, "BODY_TOO_LARGE", f"the body is over {limit} bytes")
        if not raw.strip():
            return succeed(None)  # no fields at all: MISSING_FIELDS, as the PHP gateway answers
        return self.bodies.parse(raw)

    @app.route("/session/register", methods=["POST"])
    @inlineCallbacks
    def register(self, request):
        self._require_allowed_origin(request)
        body = trimmed((yield self._json_body(request, MAX_SESSION_BODY)))
        admin = self.admin.is_admin(request)
        if not admin:
            self._check_registration_token(request, body)
        registration = validate_registration(body, self.config.domains)
        if not admin:
            registration = evolve(registration, keep_bridge=True)
        if registration.bridge_base_url:
            require_bridge_allowed(registration.bridge_base_url, self.config.bridge_allow_list)
        check_session_room(self.store, registration.domain, registration.session_name,
                           self.config.max_sessions_per_domain)
        record = yield self.store.register(registration, self.clock.seconds())
        log.info("session registered: {domain}/{name}", domain=record.domain, name=record.session_name)
        return write_json(request, 200, {"status": "ok", "domain": record.domain,
                                         "session_name": record.session_name})

    def _check_registration_token(self, request, body) -> None:
        """Without the admin token a caller may only set ids, and only for its token's name."""
        if not isinstance(body, dict):
            return  # validation refuses it next
        privileged = [f for f in ("bridge_base_url", "bridge_api_key", "models", "upstream")
                      if body.get(f)]
        if privileged:
            raise ApiError(403, "ADMIN_REQUIRED",
                           f"setting {', '.join(privileged)} needs the admin token")
        name = check_session_name(body.get("session_name"))
        token = body.get("registration_token")
        if token in (None, ""):
            raise ApiError(401, "REGISTRATION_TOKEN_REQUIRED",
                           "registering needs the registration token of the userscript from "
                           f"/userscript/generate?session_name={name}, or the admin token",
                           "authentication_error")
        if self.tokens is None or not self.tokens.is_valid(name, token):
            raise ApiError(403, "REGISTRATION_TOKEN_INVALID",
                           f"the registration token is not valid for session {name!r}: "
                           "it was revoked or belongs to another name; generate a new userscript",
                           "authentication_error")

    @app.route("/session/list", methods=["GET"])
    def list_sessions(self, request):
        self._require_admin(request)
        wanted = request.args.get(b"domain", [b""])[0].decode("utf-8", "replace")
        domain = check_domain(wanted, self.config.domains) if wanted else None
        listing: dict[str, dict] = {d: {} for d in ([domain] if domain else self.config.domains)}
        for record in sorted(self.store.records(domain), key=lambda r: r.key):
            listing.setdefault(record.domain, {})[record.session_name] = record.public()
        return write_json(request, 200, {"domains": listing})

    @app.route("/session/<domain_and_name:rest>", methods=["DELETE"])
    @inlineCallbacks
    def delete_session(self, request, rest):
        self._require_allowed_origin(request)
        self._require_admin(request)
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

    # --- the registration userscript ---

    @app.route("/userscript/generate", methods=["GET"])
    def userscript(self, request):
        # Without a name, the PHP gateway generated the script of "default"; so do we.
        name = request.args.get(b"session_name", [b""])[0].decode("utf-8", "replace").strip()
        return self._userscript(request, name or "default")

    @app.route("/userscript/<name>.user.js", methods=["GET"])
    def userscript_file(self, request, name):
        """The same script at a URL ending in .user.js: userscript managers offer to
        install such a link when it is opened."""
        return self._userscript(request, name)

    def _userscript(self, request, name: str):
        from .userscript import serve

        # The script's own @updateURL carries its registration token: it may fetch its
        # own name's script (nothing more) without the admin token.
        token = request.args.get(b"registration_token", [b""])[0].decode("utf-8", "replace")
        self.admin.guard_cors(request)  # it holds a registration token: no page may read it
        if not (token and self.tokens is not None and self.tokens.is_valid(name, token)):
            self._require_admin(request, allow_basic=True)
        if self.tokens is not None and not self.tokens.ready:
            raise ApiError(503, "STORAGE_UNAVAILABLE",
                           "the registration secret is not available yet (is the store up?)",
                           "server_error")
        return serve(request, self.config, name, tokens=self.tokens)

    # --- the tabs' channel (tab mode: docs/tab-mode.rst) ---

    def _require_tabs(self) -> TabChannel:
        if self.tabs is None:
            if self.config.workers > 1:
                raise ApiError(503, "TAB_MODE_OFF", tab_mode_off(self.config.workers))
            raise ApiError(404, "NOT_FOUND", "tab mode is not enabled here")
        return self.tab_channel

    @app.route("/tab/connect", methods=["POST"])
    def tab_connect(self, request):
        return self._require_tabs().connect(request)

    @app.route("/tab/poll", methods=["POST"])
    def tab_poll(self, request):
        return self._require_tabs().poll(request)

    @app.route("/tab/push", methods=["POST"])
    def tab_push(self, request):
        return self._require_tabs().push(request)

    # --- Prometheus metrics ---

    @app.route("/metrics", methods=["GET"])
    def scrape(self, request):
        self._require_admin(request)
        request.setHeader(b"Content-Type", self.metrics.content_type)
        return self.metrics.exposition()

    # --- the operator's page (lmarena_gateway.status) ---

    @app.route("/status", methods=["GET"])
    def status_page(self, request):
        self._require_admin(request, allow_basic=True)
        return self.status.page(request)

    @app.route("/status.json", methods=["GET"])
    def status_json(self, request):
        self._require_admin(request, allow_basic=True)
        return self.status.json(request)

    @app.route("/status/page.css", methods=["GET"])
    def status_css(self, request):
        return self.status.asset(request, "page.css")

    @app.route("/status/page.js", methods=["GET"])
    def status_js(self, request):
        return self.status.asset(request, "page.js")

    @app.route("/status/<any(revoke, delete, 'install-link'):action>", methods=["POST"])
    def status_action(self, request, action):
        self._require_admin(request, allow_basic=True)
        return self.status.act(request, action)

    # --- the OpenAI-compatible API ---

    @app.route("/v1/chat/completions", methods=["POST"])
    def chat_completions(self, request):
        return self.proxy.chat(request)

    @app.route("/v1/responses", methods=["POST"])
    def responses(self, request):
        from .responses import serve

        return serve(self.proxy, request, self.clock)

    @app.route("/v1/responses/<path:response_id>", branch=False)
    def stored_response(self, request, response_id):
        raise ApiError(404, "RESPONSE_NOT_FOUND",
                       "responses are not stored (they are answered with store: false); "
                       "send the whole conversation in 'input' instead")

    @app.route("/v1/images/generations", methods=["POST"])
    def image_generations(self, request):
        return self.proxy.images(request)

    @app.route("/v1/models", methods=["GET"])
    def models(self, request):
        return self.proxy.models(request)

    @app.route("/v1/models/<path:model_id>", methods=["GET"])
    def model(self, request, model_id):
        return self.proxy.model(request, model_id)

    @app.route("/v1/completions", branch=False)
    def completions(self, request):
        raise ApiError(404, "UNSUPPORTED_ENDPOINT",
                       "the legacy completions endpoint is not served: LMArena models are chat "
                       "models; use POST /v1/chat/completions (or /v1/responses)")

    @app.route("/v1/embeddings", branch=False)
    def embeddings(self, request):
        raise ApiError(404, "UNSUPPORTED_ENDPOINT",
                       "embeddings are not served: LMArena has no embedding models; use an "
                       "embeddings provider directly, and this gateway for chat")


