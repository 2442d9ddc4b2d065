"""The routes a tab talks to: connect, long-poll for a job, push back what it read.

Every call carries the session name, the tab's domain (its own hostname), the session's
registration token and the tab's id. The token only ever serves its own name, so team
A's tab can never take team B's requests.
"""

from __future__ import annotations

import re

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from .arena import parse_models
from .bodies import Bodies
from .errors import ApiError, write_json
from .sessions import Registration, check_domain, check_session_name, check_session_room

log = Logger()
TAB_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
MAX_CONNECT_BODY = 8 * 1024 * 1024  # the page's model list is large
MAX_PUSH_BODY = 4 * 1024 * 1024


class TabChannel:
    def __init__(self, config, store, tokens, registry, clock, *, check_origin,
                 bodies: Bodies | None = None) -> None:
        self.config = config
        self.bodies = bodies if bodies is not None else Bodies()
        self.store = store
        self.tokens = tokens
        self.registry = registry
        self.clock = clock
        self.check_origin = check_origin  # the gateway's browser-origin rule

    def _body(self, request, limit: int) -> Deferred:
        raw = request.content.read(limit + 1)
        if len(raw) > limit:
            raise ApiError(413, "BODY_TOO_LARGE", f"the body is over {limit} bytes")
        return self.bodies.parse(raw)

    def _identify(self, request, limit: int) -> Deferred:
        """Fires with (body, domain, name, tab id) of a tab whose token is valid for its name."""
        self.check_origin(request)
        return self._body(request, limit).addCallback(self._identified)

    def _identified(self, body) -> tuple[dict, str, str, str]:
        if not isinstance(body, dict):
            raise ApiError(400, "INVALID_JSON", "the body must be a JSON object")
        name = check_session_name(body.get("session_name"))
        domain = check_domain(body.get("domain"), self.config.domains)
        token = body.get("registration_token")
        if token in (None, ""):
            raise ApiError(401, "REGISTRATION_TOKEN_REQUIRED",
                           "a tab needs its session's registration token: install the "
                           f"userscript from /userscript/{name}.user.js", "authentication_error")
        if self.tokens is None or not self.tokens.is_valid(name, token):
            raise ApiError(403, "REGISTRATION_TOKEN_INVALID",
                           f"the registration token is not valid for session {name!r}: it was "
                           "revoked or belongs to another name; install a new userscript",
                           "authentication_error")
        tab_id = body.get("tab_id")
        if not isinstance(tab_id, str) or not TAB_ID.match(tab_id):
            raise ApiError(400, "INVALID_TAB_ID", "tab_id must be 8-64 characters of A-Z, a-z, "
                           "0-9, _ or -")
        return body, domain, name, tab_id

    def _tab(self, domain: str, name: str, tab_id: str):
        tab = self.registry.tab(domain, name, tab_id)
        if tab is None:
            # The gateway restarted, or the tab was silent too long: it says hello again.
            raise ApiError(409, "TAB_UNKNOWN", "this tab is not connected; connect again")
        return tab

    @inlineCallbacks
    def connect(self, request):
        body, domain, name, tab_id = yield self._identify(request, MAX_CONNECT_BODY)
        source = body.get("models_source")
        models = parse_models(source if isinstance(source, str) else "")
        if (yield self.store.lookup(domain, name)) is None:
            # A tab with a valid token creates its session, as a registration would.
            check_session_room(self.store, domain, name, self.config.max_sessions_per_domain)
            yield self.store.register(Registration(domain, name, None, None, keep_bridge=True),
                                      self.clock.seconds())
            log.info("session {domain}/{name} created by its tab", domain=domain, name=name)
        tab = self.registry.connect(domain, name, tab_id, models)
        return write_json(request, 200, {
            "status": "connected", "session_name": name, "domain": domain, "tab_id": tab.tab_id,
            "models": [m.public_name for m in models],
            "poll_timeout": self.registry.poll_timeout, "heartbeat": self.registry.heartbeat})

    def poll(self, request):
        return self._identify(request, 64 * 1024).addCallback(self._poll, request)

    def _poll(self, identified, request):
        body, domain, name, tab_id = identified
        tab = self._tab(domain, name, tab_id)
        timeout = body.get("timeout_seconds")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            timeout = self.registry.poll_timeout

        def answer(job):
            if job is None:
                request.setResponseCode(204)
                return b""
            return write_json(request, 200, {"job_id": job.job_id, "payload": job.payload})

        return self.registry.poll(tab, float(timeout)).addCallback(answer)

    def push(self, request):
        return self._identify(request, MAX_PUSH_BODY).addCallback(self._push, request)

    def _push(self, identified, request):
        body, domain, name, tab_id = identified
        tab = self._tab(domain, name, tab_id)
        job_id = body.get("job_id")
        if not isinstance(job_id, str):
            raise ApiError(400, "INVALID_REQUEST", "job_id must be a string")
        return write_json(request, 200, self.registry.push(tab, job_id, body))
